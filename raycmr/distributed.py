"""Rank/world helpers, the global batch of a contrastive loss and the one collective behind it.

Global in-batch negatives need every worker's embeddings in the loss, with gradients flowing back
to the worker that produced them (open_clip's ``gather_with_grad``). :func:`gather_global_batch`
packs this worker's image and text embeddings, group ids and row count into ONE buffer, padded to
a fixed per-worker size (``train.batch_size``: no batch is larger), and all-gathers it: one
collective per loss call, no size exchange.

Gradient without a backward collective. Every rank computes the SAME loss ``L`` of the gathered
batch (all ``N`` anchors of the global batch, not only its own): ``L`` is the single-process loss
of the concatenated batch. Rank ``r`` holds the autograd graph of its own rows only, so
``dL/d(local rows)`` is simply the local slice of ``dL/d(gathered)``, which every rank already
has. The optimizer (DDP / DeepSpeed) averages parameter gradients over ``W`` ranks, so the
backward multiplies the slice by ``W``; the update is then exactly ``dL/d(theta)`` of the
single-process run (``tests/test_gather_equivalence.py``). This equals what the former backward
all-reduce computed (``sum_r dL_r/d(gathered)`` sliced at rank ``r``) in the case where every
``L_r`` is the same ``L``, without the all-reduce. The price is that each rank scores ``N x N``
pairs instead of ``B x N`` (``W`` times the similarity work of a local-anchor loss): negligible
next to the encoders at the batch sizes here (a 1024 x 1024 matrix at 2 x 512 rows), and it
removes a collective the size of the gather from every step. A tensor that comes out of the
gather must therefore only enter losses that every rank computes identically.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class GlobalBatch:
    """The matched pairs a contrastive loss scores, and which of them are its anchors.

    ``img``, ``txt`` [N, d]: every worker's pairs in rank order (candidates of every anchor);
    ``groups`` [N] (or None: every pair its own group): pairs of one group are never negatives
    of each other. The anchors are rows ``start .. stop`` (default: all N); a loss returns the
    SUM over its anchors divided by ``denominator`` (default: the number of anchors, a mean).
    ``sizes``: rows contributed by each worker, in rank order (``(N,)`` in one process).
    """

    img: torch.Tensor
    txt: torch.Tensor
    groups: torch.Tensor | None = None
    start: int = 0
    stop: int | None = None
    denominator: float | None = None
    sizes: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return int(self.img.shape[0])

    @property
    def anchors(self) -> slice:
        return slice(self.start, self.rows if self.stop is None else self.stop)

    @property
    def anchor_count(self) -> int:
        s = self.anchors
        return s.stop - s.start

    def scale(self) -> float:
        return float(self.anchor_count if self.denominator is None else self.denominator)


# int64 group ids travel bit-for-bit inside the float buffer: one id = 8 bytes of columns
def _id_columns(dtype: torch.dtype) -> int:
    return 64 // torch.finfo(dtype).bits


class _PackedGather(torch.autograd.Function):
    """all_gather of one [pad_rows, cols] buffer per rank; backward: ``W x`` the local slice of
    the incoming gradient, no collective (module docstring)."""

    @staticmethod
    def forward(ctx: Any, packed: torch.Tensor, pad_rows: int) -> torch.Tensor:
        world, me = world_size(), rank()
        rows = packed.shape[0]
        padded = packed.new_zeros((pad_rows, packed.shape[1]))
        padded[:rows] = packed
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.rows, ctx.start, ctx.world = rows, me * pad_rows, world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad[ctx.start:ctx.start + ctx.rows] * ctx.world, None


def gather_global_batch(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor | None,
                        pad_rows: int) -> GlobalBatch:
    """Every worker's ``(img, txt, groups)`` in rank order, from ONE all_gather; the anchors are
    all ``N`` rows (each rank computes the full global loss) and the denominator is ``N``.

    ``pad_rows``: the same on every rank, at least any rank's row count (``train.batch_size``).
    Row counts may differ by rank (bad rows dropped). In a world of 1: the tensors themselves.
    """
    rows = int(img.shape[0])
    if world_size() == 1:
        return GlobalBatch(img, txt, groups, sizes=(rows,))
    if rows > pad_rows:
        raise ValueError(f"a worker's batch has {rows} rows, more than the {pad_rows} rows every "
                         "worker reserves in the embedding gather (train.batch_size)")
    dim, dtype, device = img.shape[1], img.dtype, img.device
    id_cols = _id_columns(dtype)
    # columns: img | txt | group id (int64 bits) | row count of this rank (int64 bits)
    ints = torch.zeros(rows, 2, dtype=torch.int64, device=device)
    if groups is not None:
        ints[:, 0] = groups.to(device=device, dtype=torch.int64)
    ints[:, 1] = rows
    packed = torch.cat([img, txt.to(dtype), ints.view(dtype).reshape(rows, 2 * id_cols)], dim=1)
    if rows == 0:  # nothing to carry the count: an all-zero slot reads as 0 rows
        packed = packed.new_zeros((0, packed.shape[1]))
    gathered = _PackedGather.apply(packed, pad_rows)
    world = world_size()
    slots = gathered.reshape(world, pad_rows, -1)
    meta = slots[:, :, 2 * dim:].detach().contiguous().view(torch.int64)  # [W, pad, 2]
    sizes = tuple(int(meta[r, 0, 1]) for r in range(world))
    keep = torch.cat([torch.arange(r * pad_rows, r * pad_rows + n, device=device)
                      for r, n in enumerate(sizes)])
    rows_all = gathered.index_select(0, keep)
    groups_all = meta.reshape(world * pad_rows, 2)[keep, 0] if groups is not None else None
    total = sum(sizes)
    return GlobalBatch(rows_all[:, :dim], rows_all[:, dim:2 * dim], groups_all,
                       denominator=float(total), sizes=sizes)


def local_batch(img: torch.Tensor, txt: torch.Tensor,
                groups: torch.Tensor | None = None) -> GlobalBatch:
    """The global batch of one worker alone (``loss.global_negatives=false``)."""
    return GlobalBatch(img, txt, groups, sizes=(int(img.shape[0]),))


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


def while_all_have(items: Iterable[T]) -> Iterator[T]:
    """The items of ``items`` for as long as *every* rank still has one.

    Before each item the ranks agree (all-reduce MIN of "I have one"): one collective per item.
    The training loop does not use it (it runs a step count fixed on the driver, see
    :class:`raycmr.train.loop.FixedSteps`); it stays for loops whose length is not known.
    """
    iterator = iter(items)
    while True:
        item = next(iterator, _END)
        has = item is not _END
        if world_size() > 1:
            t = torch.tensor([int(has)], dtype=torch.long, device=comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            has = bool(t.item())
        if not has:
            return
        yield item


_END = object()


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
