"""GradCache (Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", RepL4NLP 2021): a contrastive step whose encoder activations are alive for one
chunk of rows at a time, equal to the unchunked step (``train.embed_chunk``).

With the batch's embeddings ``e = f_theta(x)`` and a loss ``L(e, phi)`` that couples all rows
(here: the gathered global batch, ``phi`` the loss's own parameters)::

    1. e_c = f_theta(x_c) for each chunk c, without graph          (no activations kept)
    2. L(e, phi) on e as leaves, one backward: g = dL/de, dL/dphi    (the gather's collective)
    3. for each chunk c: e_c = f_theta(x_c) again, with graph, and
       the backward of <e_c, g_c>                                    (dL/dtheta accumulates)

By the chain rule step 3's sum over chunks is ``sum_c (de_c/dtheta)^T g_c = dL/dtheta``. Each
chunk's random state is recorded before step 1 and replayed in step 3 (the paper's
``RandContext``), so dropout draws the same masks in both passes.

Every backward goes through a ``backward(tensor, last)`` callable: the training loop's is
:func:`engine_backward` (DeepSpeed: all but the last backward under ``engine.no_sync()``, so
the step all-reduces its gradients once, as the unchunked step does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = dict[str, Any]
Encode = Callable[[Batch], tuple[torch.Tensor, ...]]
Backward = Callable[[torch.Tensor, bool], None]  # (scalar, is the step's last backward)


def row_chunks(rows: int, chunk: int) -> list[slice]:
    """``[0, chunk), [chunk, 2 chunk), ...`` covering ``rows`` rows (none for 0 rows)."""
    return [slice(s, min(s + chunk, rows)) for s in range(0, rows, chunk)]


def take_rows(batch: Batch, rows: slice) -> Batch:
    """The rows ``rows`` of every tensor of ``batch`` (all row-aligned), nested dicts too."""
    return {k: take_rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in batch.items()}


def refuse_batch_statistics(module: nn.Module) -> None:
    """A BatchNorm in training mode normalises a chunk by the chunk's statistics, not the
    batch's: the chunked step would be another step. One line naming the fix."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
            raise ValueError(f"train.embed_chunk: '{name}' is a BatchNorm, whose statistics of a "
                             "chunk are not the batch's; use a tower without BatchNorm or set "
                             "train.embed_chunk=0")


def _devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None],
                 device: torch.device) -> Iterator[None]:
    """Run with the CPU (and ``device``'s CUDA) random state ``state``; the state from before
    is back afterwards (``torch.random.fork_rng``)."""
    with torch.random.fork_rng(devices=_devices(device)):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@dataclass
class Cached:
    """Step 1's result: the batch's embeddings as leaves that will receive ``dL/de``, and what
    step 3 needs to encode each chunk again exactly as it was."""

    leaves: tuple[torch.Tensor, ...]
    batch: Batch
    chunks: list[slice]
    states: list[tuple[torch.Tensor, torch.Tensor | None]]
    device: torch.device


def embed_without_graph(encode: Encode, batch: Batch, rows: int, chunk: int,
                        device: torch.device) -> Cached:
    """Step 1: ``encode`` the ``rows`` rows of ``batch`` chunk by chunk without graph; the
    concatenated outputs become leaves (``requires_grad``) for the loss."""
    chunks, states, parts = row_chunks(rows, chunk), [], []
    with torch.no_grad():
        for part in chunks:
            states.append(_rng_state(device))
            parts.append(encode(take_rows(batch, part)))
    if not parts:  # an empty batch: one (empty) pass for the output shapes
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(device)):
            parts.append(encode(batch))
    leaves = tuple(torch.cat(outs).requires_grad_() for outs in zip(*parts))
    return Cached(leaves, batch, chunks, states, device)


def backward_through_chunks(encode: Encode, loss: torch.Tensor, cached: Cached,
                            backward: Backward) -> None:
    """Steps 2 and 3: the loss's backward to the leaves, then each chunk encoded again with
    graph and its slice of the leaves' gradient. ``backward(t, last)`` backpropagates the
    scalar ``t`` (``last``: the step's final backward); the chunks' scalars carry the leaves'
    gradients as they are (any scaling the loss's backward applied applies once)."""
    backward(loss, not cached.chunks)
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
             for leaf in cached.leaves]
    for i, rows in enumerate(cached.chunks):
        with replayed_rng(cached.states[i], cached.device):
            outs = encode(take_rows(cached.batch, rows))
        # d<e_c, g_c>/de_c = g_c: the chunk's share of dL/dtheta (module docstring)
        surrogate = sum((out * g[rows].to(out.dtype)).sum() for out, g in zip(outs, grads))
        backward(surrogate, i == len(cached.chunks) - 1)


def engine_backward(engine: Any) -> Backward:
    """DeepSpeed's backward for :func:`backward_through_chunks`: every backward but the step's
    last under ``engine.no_sync()`` (the gradients are reduced once, after the last chunk).
    ``engine.backward`` divides the loss by ``grad_accum``, so the leaves' gradients already
    carry it: the chunks' backward passes do not divide again (``scale_wrt_gas=False``)."""
    first = True

    def backward(t: torch.Tensor, last: bool) -> None:
        nonlocal first
        with contextlib.nullcontext() if last else engine.no_sync():
            engine.backward(t, scale_wrt_gas=first)
        first = False

    return backward
