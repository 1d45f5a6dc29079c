"""Where the training workers run: each worker's own Ray node id, gathered in rank order.

Reported with every epoch's metrics (``worker_nodes``) and saved in each checkpoint's
``state.json``, so a run shows which nodes its workers used, before and after a restart."""

from __future__ import annotations

import ray
import torch.distributed as dist


def worker_nodes() -> str:
    """Comma-separated node ids of all workers (rank 0 first); a collective: every rank calls it."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return node
    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return ",".join(str(n) for n in nodes)
