"""Will the cluster fit the work? A check made before any Ray Train, Ray Data or Serve work.

Ray waits forever for resources it does not have: a training run whose workers take every CPU
leaves Ray Data none and stays RUNNING in silence; a Serve app larger than the cluster stays
DEPLOYING. :func:`check_cluster_fits` compares a :class:`Demand` (actors that each need one node's
resources, plus free CPUs anywhere) with the alive nodes, and with the autoscaler's maximum when
the cluster has one, and stops at once with one line naming what is missing and the setting that
changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raycmr.config import Config, ConfigError

# Resources that every node reports and no raycmr actor asks for.
_IGNORED = ("memory", "object_store_memory")


class ClusterTooSmall(ConfigError):
    """The cluster (even scaled to its autoscaler's maximum) cannot run the requested work."""


@dataclass
class Demand:
    """What a piece of work needs from the cluster.

    ``bundles``: one resource dict per actor (training worker, Serve replica); each must fit on
    one node. ``free_cpus``: CPUs that must stay free on top of them, on any node (Ray Data's
    read and preprocessing tasks). ``what`` names the work and ``settings`` the config keys or
    options that change the demand, both for the error message.
    """

    bundles: list[dict[str, float]]
    free_cpus: float = 0.0
    what: str = "the job"
    settings: str = ""
    labels: list[str] = field(default_factory=list)  # one name per bundle (optional)


def training_demand(cfg: Config) -> Demand:
    """Training: ``train.num_workers`` x (CPUs, GPUs, custom resources) + ``data.reserved_cpus``."""
    worker = {"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources}
    if cfg.train.use_gpu:
        worker["GPU"] = 1.0
    return Demand(
        bundles=[dict(worker) for _ in range(cfg.train.num_workers)],
        free_cpus=cfg.data.reserved_cpus,
        what=f"training ({cfg.train.num_workers} workers x {_fmt(worker)} "
             f"+ {cfg.data.reserved_cpus:g} CPU for Ray Data)",
        settings="train.num_workers, train.cpus_per_worker, train.use_gpu, "
                 "train.worker_resources, data.reserved_cpus",
    )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _place(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> int | None:
    """Place ``bundles`` on ``nodes`` (first fit, largest bundle first, node capacities reduced
    in place); returns the index of the first bundle that fits nowhere, or None."""
    order = sorted(range(len(bundles)), key=lambda i: -sum(bundles[i].values()))
    for i in order:
        bundle = bundles[i]
        for node in nodes:
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return i
    return None


def missing_resources(demand: Demand, nodes: list[dict[str, float]],
                      autoscaler_max: dict[str, float] | None = None) -> str | None:
    """What ``demand`` lacks on a cluster of ``nodes`` (each node's total resources), or None.

    Without an autoscaler every bundle must fit on one of the nodes (first-fit packing) and
    ``free_cpus`` must remain. With an autoscaler (``autoscaler_max``: its maximum total of each
    resource) only the totals are checked against that maximum: new nodes may come up.
    """
    need: dict[str, float] = {}
    for bundle in demand.bundles:
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    need["CPU"] = need.get("CPU", 0.0) + demand.free_cpus
    if autoscaler_max:
        have = {k: max(autoscaler_max.get(k, 0.0), sum(n.get(k, 0.0) for n in nodes))
                for k in need}
        short = {k: v for k, v in need.items() if v > have[k] + 1e-9}
        if short:
            return ", ".join(f"{v:g} {k} (the autoscaler's maximum is {have[k]:g})"
                             for k, v in sorted(short.items()))
        return None
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    short = {k: v for k, v in need.items() if v > totals[k] + 1e-9}
    if short:
        return ", ".join(f"{v:g} {k} in total (the cluster has {totals[k]:g})"
                         for k, v in sorted(short.items()))
    left = [dict(n) for n in nodes]
    unplaced = _place(demand.bundles, left)
    if unplaced is not None:
        label = demand.labels[unplaced] if demand.labels else "one actor"
        bundle = demand.bundles[unplaced]
        best = max(left, key=lambda n: sum(min(n.get(k, 0.0), v) / v for k, v in bundle.items() if v))
        return (f"{_fmt(bundle)} on a single node for {label} "
                f"(at most {_fmt({k: best.get(k, 0.0) for k in bundle})} left on any node)")
    free = sum(n.get("CPU", 0.0) for n in left)
    if free < demand.free_cpus - 1e-9:
        return f"{demand.free_cpus:g} free CPU beside the actors (only {free:g} left)"
    return None


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()
             if k not in _IGNORED and not k.startswith("node:")}
            for n in ray.nodes() if n["Alive"]]


def autoscaler_max_resources() -> dict[str, float] | None:
    """The autoscaler's maximum resource totals (from its cluster config), None without one."""
    from raycmr.compat import autoscaler_max_resources as max_from_cluster_config

    found = max_from_cluster_config()
    return {k: float(v) for k, v in found.items()} if found else None


def check_cluster_fits(demand: Demand) -> None:
    """Raise :class:`ClusterTooSmall` (one line) if the connected cluster cannot run ``demand``."""
    missing = missing_resources(demand, cluster_nodes(), autoscaler_max_resources())
    if missing:
        hint = f"; change {demand.settings}" if demand.settings else ""
        raise ClusterTooSmall(
            f"the Ray cluster is too small for {demand.what}: it needs {missing}{hint}, "
            "or add nodes (ray start --address ...)"
        )
