"""Connecting to Ray: an existing cluster when there is one, otherwise a local one on demand."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from raycmr.config import ConfigError

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # Ray's GCS_PORT_ENVIRONMENT_VARIABLE (ray_constants)


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
    start_local_ray(num_cpus=num_cpus, log_to_driver=True)


def start_timeout_message() -> str:
    """What to do when Ray's local node did not register in time (Ray waits a fixed 30 s)."""
    load = os.getloadavg()[0]
    return (f"the local Ray cluster did not start within Ray's 30 s (load average {load:.0f} on "
            f"{os.cpu_count()} cores): run again when the machine is less busy, or start a "
            "cluster once with `ray start --head` and set RAY_ADDRESS=auto")


def start_local_ray(num_cpus: int, **init_kwargs) -> str:
    """Start a local Ray cluster that its own processes, and they only, resolve "auto" to;
    returns its GCS address.

    ``address="local"`` keeps the driver off a cluster that ``ray start`` left on the machine
    (joined only through RAY_ADDRESS). Ray's helpers inside the cluster resolve an address by
    themselves, though (Ray Train's PlacementGroupCleaner builds a State API client with no
    address): RAY_ADDRESS, else the ``ray_current_cluster`` file in Ray's temp folder, which
    names the last ``ray start`` cluster, dead or alive. So the GCS port is chosen first and
    every worker of this job gets ``RAY_ADDRESS`` = this cluster.
    """
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": address}
    saved = os.environ.get(GCS_PORT_VARIABLE)
    os.environ[GCS_PORT_VARIABLE] = str(port)  # read by the head node it starts, once
    try:
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, **init_kwargs)
    except Exception as exc:
        if "timed out during startup" not in str(exc):
            raise
        raise ConfigError(start_timeout_message()) from exc
    finally:
        if saved is None:
            os.environ.pop(GCS_PORT_VARIABLE, None)
        else:
            os.environ[GCS_PORT_VARIABLE] = saved
    gcs = ray.get_runtime_context().gcs_address
    if gcs.rsplit(":", 1)[1] != str(port):
        raise RuntimeError(f"the local Ray cluster's GCS is at {gcs}, not port {port}")
    return gcs
