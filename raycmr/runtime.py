"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on demand."""

from __future__ import annotations

import os

import ray


def init_ray(min_cpus: float = 0) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local one.

    A local cluster advertises at least ``min_cpus`` logical CPUs so that training workers and
    Ray Data's CPU tasks can run side by side on a small machine (they time-share the cores).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    num_cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999))
    # The dashboard stays on: its State API is how Ray Train's PlacementGroupCleaner sees that a
    # run's controller died (a trial stopped by ASHA) and frees the run's worker placement
    # group; without it the CPUs stay reserved and later trials wait forever.
    # address="local": a cluster left by `ray start` on this machine is joined only through
    # RAY_ADDRESS, never by accident (ray.init() alone would attach to it).
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)
