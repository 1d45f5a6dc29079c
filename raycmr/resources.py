"""Will the cluster fit the work? A check made before any Ray Train, Ray Data or Serve work.

Ray waits forever for resources it does not have: a training run whose workers take every CPU
leaves Ray Data none and stays RUNNING in silence; a Serve app larger than the cluster stays
DEPLOYING. :func:`check_cluster_fits` places a :class:`Demand` (actors that each need one node's
resources, plus free CPUs anywhere) on what the alive nodes have free (their totals less what
other jobs, actors and Serve apps hold now) and, when the cluster has an autoscaler, on the nodes
its node types may still add (each type up to its max count); it stops at once with one line
naming what is missing and the setting that changes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from raycmr.config import Config, ConfigError

logger = logging.getLogger(__name__)

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
    replaces_serve_app: str = ""  # a Serve app this work replaces: its replicas' share is free


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


@dataclass
class NodeType:
    """One node group of the autoscaler: each node's resources and how many it may run (-1: no
    limit)."""

    resources: dict[str, float]
    max_count: int
    name: str = ""


UNLIMITED = 1_000_000  # nodes of a node type without a max_count


def _short_in_total(need: dict[str, float], nodes: list[dict[str, float]],
                    free: list[dict[str, float]]) -> str | None:
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    have = {k: sum(n.get(k, 0.0) for n in free) for k in need}
    short = {k: v for k, v in need.items() if v > have[k] + 1e-9}
    if not short:
        return None

    def cluster_has(k: str) -> str:
        used = totals[k] - have[k]
        return f"{totals[k]:g}" + (f", {used:g} of them in use" if used > 1e-9 else "")

    return ", ".join(f"{v:g} {k} in total (the cluster has {cluster_has(k)})"
                     for k, v in sorted(short.items()))


def _fits(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())


def _launchable(node_types: list[NodeType], nodes: list[dict[str, float]]) -> list[int]:
    """Nodes of each type the autoscaler may still add: its max_count less the current nodes
    with exactly that type's resources."""
    counts = []
    for t in node_types:
        running = sum(all(abs(n.get(k, 0.0) - v) < 1e-9 for k, v in t.resources.items())
                      for n in nodes)
        counts.append(UNLIMITED if t.max_count < 0 else max(0, t.max_count - running))
    return counts


def missing_resources(demand: Demand, nodes: list[dict[str, float]],
                      node_types: list[NodeType] | None = None,
                      in_use: list[dict[str, float]] | None = None) -> str | None:
    """What ``demand`` lacks on a cluster of ``nodes`` (each node's total resources, ``in_use``
    what is already taken on each), or None.

    Each bundle must fit on one node's free resources (first fit, largest bundle first) and
    ``free_cpus`` must remain. With an autoscaler (``node_types``), a bundle that fits on no
    current node starts a node of the smallest type that holds it, up to the type's max count.
    """
    free = [{k: v - (in_use[i].get(k, 0.0) if in_use else 0.0) for k, v in n.items()}
            for i, n in enumerate(nodes)]
    need: dict[str, float] = {}
    for bundle in demand.bundles:
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    need["CPU"] = need.get("CPU", 0.0) + demand.free_cpus
    if not node_types:
        short = _short_in_total(need, nodes, free)
        if short:
            return short
    types = sorted(node_types or [], key=lambda t: sum(t.resources.values()))
    launchable = _launchable(types, nodes)
    left = [dict(n) for n in free]
    for i in sorted(range(len(demand.bundles)), key=lambda i: -sum(demand.bundles[i].values())):
        bundle = demand.bundles[i]
        node = next((n for n in left if _fits(n, bundle)), None)
        if node is None:
            t = next((j for j, t in enumerate(types)
                      if launchable[j] and _fits(t.resources, bundle)), None)
            if t is None:
                return _unplaced(demand, i, left, types)
            launchable[t] -= 1
            node = dict(types[t].resources)
            left.append(node)
        for k, v in bundle.items():
            node[k] = node.get(k, 0.0) - v
    spare = sum(n.get("CPU", 0.0) for n in left) + sum(
        c * t.resources.get("CPU", 0.0) for c, t in zip(launchable, types))
    if spare < demand.free_cpus - 1e-9:
        return f"{demand.free_cpus:g} free CPU beside the actors (only {spare:g} left)"
    return None


def _unplaced(demand: Demand, i: int, left: list[dict[str, float]],
              types: list[NodeType]) -> str:
    """The message for bundle ``i``, which fits on no node left and no node the autoscaler may
    add."""
    label = demand.labels[i] if demand.labels else "one actor"
    bundle = demand.bundles[i]

    def closest(pool: list[dict[str, float]]) -> dict[str, float]:
        best = max(pool, key=lambda n: sum(min(n.get(k, 0.0), v) / v
                                           for k, v in bundle.items() if v))
        return {k: best.get(k, 0.0) for k in bundle}

    head = f"{_fmt(bundle)} on a single node for {label}"
    if not types:
        return f"{head} (at most {_fmt(closest(left))} left on any node)"
    if not any(_fits(t.resources, bundle) for t in types):
        return (f"{head} (no node type of the autoscaler holds it; the closest has "
                f"{_fmt(closest([t.resources for t in types]))})")
    return f"{head} (the autoscaler's node types that hold it are all at their max_count)"


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [total for _, total in _alive_nodes()]


def _alive_nodes() -> list[tuple[str, dict[str, float]]]:
    import ray

    return [(n["NodeID"], _plain(n["Resources"])) for n in ray.nodes() if n["Alive"]]


def _plain(resources: dict) -> dict[str, float]:
    """Resources a raycmr actor may ask for: no memory, node ids or placement-group shares."""
    return {k: float(v) for k, v in resources.items()
            if k not in _IGNORED and not k.startswith("node:") and "_group_" not in k}


def cluster_in_use(nodes: list[tuple[str, dict[str, float]]],
                   replacing_app: str = "") -> list[dict[str, float]]:
    """What is taken on each of ``nodes`` now (total - available), less what the replicas of
    the Serve app ``replacing_app`` hold (a redeploy frees them)."""
    from raycmr.compat import available_resources_per_node

    available = available_resources_per_node()
    freed = _serve_app_resources(replacing_app) if replacing_app else {}
    used = []
    for node_id, total in nodes:
        avail = _plain(available.get(node_id, total))
        back = freed.get(node_id, {})
        used.append({k: max(0.0, v - avail.get(k, 0.0) - back.get(k, 0.0))
                     for k, v in total.items()})
    return used


def _serve_app_resources(app: str) -> dict[str, dict[str, float]]:
    """Resources the alive replicas of Serve app ``app`` hold, per node id (State API)."""
    from ray.util.state import list_actors

    from raycmr.compat import serve_replica_prefix

    prefix = f"{serve_replica_prefix()}{app}#"
    held: dict[str, dict[str, float]] = {}
    import ray

    for actor in list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                             raise_on_missing_output=False):
        if (actor.name or "").startswith(prefix) and actor.node_id:
            node = held.setdefault(actor.node_id, {})
            for k, v in _plain(actor.required_resources or {}).items():
                node[k] = node.get(k, 0.0) + v
    return held


def autoscaler_node_types() -> list[NodeType] | None:
    """The autoscaler's node types (from its cluster config), None without one."""
    from raycmr.compat import autoscaler_node_groups

    groups = autoscaler_node_groups()
    if not groups:
        return None
    return [NodeType(_plain(resources), int(count), name) for name, resources, count in groups]


def check_cluster_fits(demand: Demand) -> None:
    """Raise :class:`ClusterTooSmall` (one line) if the connected cluster cannot run ``demand``
    beside what already runs on it."""
    nodes = _alive_nodes()
    try:
        in_use = cluster_in_use(nodes, demand.replaces_serve_app)
    except Exception as exc:  # noqa: BLE001 - no State API (dashboard off): check the totals
        logger.warning("the cluster check counts node totals only: what runs now is unknown "
                       "(%s: %s)", type(exc).__name__, exc)
        in_use = None
    missing = missing_resources(demand, [total for _, total in nodes], autoscaler_node_types(),
                                in_use)
    if missing:
        hint = f"; change {demand.settings}" if demand.settings else ""
        raise ClusterTooSmall(
            f"the Ray cluster is too small for {demand.what}: it needs {missing}{hint}, "
            "or add nodes (ray start --address ...)"
        )
