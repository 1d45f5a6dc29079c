"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on demand."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from raycmr.config import ConfigError


def joining_cluster() -> bool:
    """True when raycmr joins an existing cluster (RAY_ADDRESS set, as under ``ray job submit``)
    instead of starting a local one."""
    return bool(os.environ.get("RAY_ADDRESS"))


def cluster_storage_path(path: str, key: str) -> str:
    """``path`` (a run/output location that workers write to) as Ray should get it: an absolute
    local path or a URI.

    When joining a cluster a relative path is refused: under ``ray job submit`` it would resolve
    inside the job's temporary working-dir copy (``/tmp/ray/session_*/runtime_resources/...``),
    which Ray deletes, and other nodes could not see it anyway."""
    if "://" in path:
        return path
    if joining_cluster() and not Path(path).expanduser().is_absolute():
        raise ConfigError(
            f"{key}={path!r} is relative: on a Ray cluster it would land in the job's temporary "
            f"working-dir copy; set {key} to an absolute path on storage every node shares "
            f"(e.g. {key}=/mnt/shared/runs) or a URI ({key}=s3://bucket/runs)"
        )
    return str(Path(path).expanduser().resolve())


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
