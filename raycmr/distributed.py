"""Rank/world helpers and an all_gather that carries gradients (a single process is a world of 1).

Global in-batch negatives need every worker's embeddings in its loss, with gradients flowing back
to the worker that produced them (open_clip's ``gather_with_grad``). :class:`_AllGatherWithGrad`
implements it with primitives that every backend has (gloo included): all_gather forward, and in
backward an all_reduce(SUM) of the gradient w.r.t. the gathered tensor, of which each rank keeps
its own slice. With each rank computing loss ``L_r`` on the gathered batch and the optimizer
averaging parameter gradients over ``W`` ranks (DDP / DeepSpeed), the update equals the gradient of
``(1/W) * sum_r L_r``: when each ``L_r`` is the full global loss, exactly the single-process
gradient on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


def _gather_sizes(rows: int) -> list[int]:
    device = comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of tensors whose dim 0 differs by rank (e.g. after bad rows were dropped):
    pad to the largest, gather, cut the padding out again."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.sizes, ctx.rank = _gather_sizes(tensor.shape[0]), rank()
        return _gather_padded(tensor, ctx.sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank holds dL_r/d(gathered); the sum over ranks, sliced at this rank's rows, is
        # the gradient of sum_r L_r w.r.t. the local input. Pad so all ranks reduce equal shapes.
        longest = max(ctx.sizes)
        full = grad.new_zeros((len(ctx.sizes) * longest, *grad.shape[1:]))
        offset = 0
        for r, n in enumerate(ctx.sizes):
            full[r * longest : r * longest + n] = grad[offset : offset + n]
            offset += n
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
        start = ctx.rank * longest
        return full[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, in rank order, keeping the autograd
    graph to the local part. Dim 0 may differ by rank. Identity in a world of 1."""
    if world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (sizes may differ) without gradient."""
    if world_size() == 1:
        return tensor.detach()
    return _gather_padded(tensor.detach(), _gather_sizes(tensor.shape[0]))


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over all ranks (the value itself in a world of 1)."""
    return all_reduce_sum(value) / world_size()


def all_reduce_sum(value: float) -> float:
    """Sum of a Python number over all ranks."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def while_all_have(items: Iterable[T]) -> Iterator[T]:
    """The items of ``items`` for as long as *every* rank still has one.

    Before each item the ranks agree (all-reduce MIN of "I have one"). Each worker's stream
    holds an equal share of the *rows*, but bad rows are dropped after the split, so one worker
    can run out of full batches first; without the agreement the others would enter the next
    step's collectives (embedding gather, gradient all-reduce) alone and wait forever.
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


def rows_before_and_total(rows: int) -> tuple[int, int]:
    """(rows held by lower ranks, rows over all ranks): where this rank's slice starts in a
    rank-ordered gather, and the global batch size."""
    if world_size() == 1:
        return 0, rows
    sizes = _gather_sizes(rows)
    return sum(sizes[: rank()]), sum(sizes)


def sum_counters(counter: dict[str, int]) -> dict[str, int]:
    """Key-wise sum of a ``{name: count}`` dict over all ranks (keys may differ by rank)."""
    if world_size() == 1:
        return dict(sorted(counter.items()))
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, dict(counter))
    total: dict[str, int] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0) + int(value)
    return dict(sorted(total.items()))
