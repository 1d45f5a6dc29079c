"""Rank/world helpers and the one collective of a global contrastive loss.

Global in-batch negatives need every worker's embeddings in the loss, with gradients flowing back
to the worker that produced them (open_clip's ``gather_with_grad``). :func:`gather_rows` packs
this worker's rows (embeddings as float columns, group ids as int64 bits inside them, and the
row count) into ONE buffer padded to a fixed per-worker size (``train.batch_size``: no batch is
larger) and all-gathers it: one collective forward, no size exchange.

Backward, by what the ranks' losses are (:mod:`raycmr.losses.batch` builds both):

- ``same_loss`` (``loss.anchors=global``): every rank computes the SAME loss ``L`` of all ``N``
  rows, so ``sum_r dL_r/d(gathered) = W dL/d(gathered)`` and each rank already holds it: the
  backward is ``W x`` the local slice, no collective.
- otherwise (``loss.anchors=local``): rank ``r``'s loss ``L_r`` scores its own anchors; the
  backward sums the ranks' gradients of the gathered rows and returns each rank its slice
  (``reduce_scatter_tensor`` under NCCL; gloo has no reduce-scatter, so an all-reduce and the
  slice): one collective backward. The sum is taken in float32 (at least) for bf16 embeddings.

In both, with ``sum_r L_r = W L``, DeepSpeed's average of the parameter gradients over ``W``
ranks is exactly ``dL/d(theta)`` of one process on the concatenated batch
(``tests/test_gather_equivalence.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def end_spawned_process(code: int = 0) -> NoReturn:
    """End a process started by ``torch.multiprocessing`` (a test's or benchmark's gloo rank)
    once its work is done and its process group destroyed, without the interpreter's teardown:
    torch's distributed stack can abort (SIGABRT) while tearing down at exit, after the work
    the parent reads has been written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def comm_device() -> torch.device:
    """Where the tensors of a collective must live: the current CUDA device under NCCL (it
    refuses CPU tensors), the CPU otherwise (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# int64 ids travel bit-for-bit inside the float buffer: one id = 8 bytes of columns
def _id_columns(dtype: torch.dtype) -> int:
    return 64 // torch.finfo(dtype).bits


class _GatherRows(torch.autograd.Function):
    """all_gather of one [pad_rows, cols] buffer per rank (module docstring for the backward);
    only the first ``grad_cols`` columns carry gradient."""

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, pad_rows: int, grad_cols: int,
                same_loss: bool) -> torch.Tensor:
        world, me = world_size(), rank()
        rows = packed.shape[0]
        padded = packed.new_zeros((pad_rows, packed.shape[1]), device=comm_device())
        padded[:rows] = packed
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.rows, ctx.pad_rows, ctx.world, ctx.me = rows, pad_rows, world, me
        ctx.grad_cols, ctx.same_loss, ctx.device = grad_cols, same_loss, packed.device
        return torch.cat(parts).to(packed.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        start, rows, cols = ctx.me * ctx.pad_rows, ctx.rows, ctx.grad_cols
        out = grad.new_zeros((rows, grad.shape[1]))
        if ctx.same_loss:
            out[:, :cols] = grad[start:start + rows, :cols] * ctx.world
            return out, None, None, None
        wide = torch.promote_types(grad.dtype, torch.float32)  # bf16 gradients summed in fp32
        summed = grad[:, :cols].to(device=comm_device(), dtype=wide).contiguous()
        if dist.get_backend() == "nccl":
            mine = summed.new_empty((ctx.pad_rows, cols))
            dist.reduce_scatter_tensor(mine, summed)
        else:
            dist.all_reduce(summed)
            mine = summed[start:start + ctx.pad_rows]
        out[:, :cols] = mine[:rows].to(device=ctx.device, dtype=grad.dtype)
        return out, None, None, None


def gather_rows(floats: torch.Tensor, ids: torch.Tensor | None, pad_rows: int, *,
                same_loss: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Every rank's rows in rank order, from ONE all_gather with gradient.

    ``floats`` [rows, c] (with grad), ``ids`` [rows, k] integers (or None) of this rank; the
    ranks' row counts may differ (down to 0) but never exceed ``pad_rows`` (the same on every
    rank). Returns ``(floats [N, c], ids [N, k] int64, sizes)``, ``sizes`` the row count of
    each rank. ``same_loss``: every rank computes the same loss of all rows (module
    docstring). In a world of 1: the tensors themselves.
    """
    rows, c = int(floats.shape[0]), int(floats.shape[1])
    k = 0 if ids is None else int(ids.shape[1])
    if world_size() == 1:
        got = ids.to(torch.int64) if ids is not None else floats.new_zeros((rows, 0), dtype=torch.int64)
        return floats, got, (rows,)
    if rows > pad_rows:
        raise ValueError(f"a worker's batch has {rows} rows, more than the {pad_rows} rows every "
                         "worker reserves in the embedding gather (train.batch_size)")
    dtype, device = floats.dtype, floats.device
    id_cols = _id_columns(dtype)
    # columns: floats | ids (int64 bits) | row count of this rank (int64 bits)
    ints = torch.full((rows, k + 1), rows, dtype=torch.int64, device=device)
    if ids is not None:
        ints[:, :k] = ids.to(device=device, dtype=torch.int64)
    packed = torch.cat([floats, ints.view(dtype).reshape(rows, (k + 1) * id_cols)], dim=1)
    gathered = _GatherRows.apply(packed, pad_rows, c, same_loss)
    world = world_size()
    meta = gathered[:, c:].detach().contiguous().view(torch.int64)  # [W * pad, k + 1]
    # an empty rank's slot is all zeros: its row count reads as 0
    sizes = tuple(int(meta[r * pad_rows, k]) for r in range(world))
    keep = torch.cat([torch.arange(r * pad_rows, r * pad_rows + n, device=device)
                      for r, n in enumerate(sizes)])
    return gathered[keep, :c], meta[keep, :k], sizes


def gather_objects(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order (one ``all_gather_object``; ``[obj]`` alone)."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(value: float) -> float:
    """Sum of a Python number over all ranks."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def merge_counts(parts: Iterable[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + int(value)
    return dict(sorted(total.items()))


def sharded_map(batches: Iterable[T], fn: Callable[[T], dict[str, Any]], *,
                equal_calls: bool = False) -> list[dict[str, Any]] | None:
    """Apply ``fn`` to this rank's share of ``batches`` (batch ``b`` on rank ``b mod W``) and
    return every batch's result in the order of ``batches`` on rank 0 (None elsewhere).

    Every rank must iterate the same ``batches``. ``equal_calls``: every rank calls ``fn`` the
    same number of times (ZeRO-3 gathers parameters inside each forward, so all ranks must
    run the same forwards): a rank with one batch fewer runs ``fn`` on batch 0 once more and
    drops the result. One ``all_gather_object`` at the end.
    """
    world, me = world_size(), rank()
    mine: list[tuple[int, dict[str, Any]]] = []
    first = None
    count = 0
    for b, batch in enumerate(batches):
        if b == 0:
            first = batch
        count = b + 1
        if b % world == me:
            mine.append((b, fn(batch)))
    if equal_calls and first is not None and len(mine) < -(-count // world):
        fn(first)
    parts = gather_objects(mine)
    if me != 0:
        return None
    return [result for _, result in sorted((item for part in parts for item in part),
                                           key=lambda item: item[0])]
