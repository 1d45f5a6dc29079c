"""The global batch a contrastive loss scores: which rows are candidates, which are anchors.

With ``W`` workers of ``B_r`` pairs each, the candidates are all ``N = sum_r B_r`` pairs,
gathered in rank order by one packed all_gather with gradient
(:func:`raycmr.distributed.gather_rows`). Two ways to split the work (``loss.anchors``):

- ``global``: every rank scores all ``N`` anchors against all ``N`` candidates (``N x N`` per
  rank) and computes the SAME loss ``L`` of the concatenated batch; the gather's backward needs
  no collective (``W x`` the local slice of ``dL/d(gathered)``).
- ``local`` (open_clip's ``local_loss=True, gather_with_grad=True``): rank ``r``'s own rows are
  the anchors of both directions against all ``N`` candidates (``B_r x N`` per rank). Its loss
  is ``L_r = (W / N) sum_{i in own anchors} l_i``, so that ``mean_r L_r = L``; the gather's
  backward sums the ranks' candidate gradients (one reduce-scatter / all-reduce), which gives
  rank ``r`` ``W dL/d(own rows)``, and DeepSpeed's average over ``W`` ranks of the parameter
  gradients is exactly ``dL/d(theta)`` of the single-process run on the concatenated batch.

``auto`` takes ``global`` while its ``N x N`` work is cheaper than ``local``'s ``B x N`` plus a
backward collective: up to :data:`AUTO_GLOBAL_MAX_WORKERS` workers
(``benchmarks/bench_loss_scaling.py`` measures the crossover).

Extra caption candidates (e.g. compositional hard negatives, NegCLIP): ``extra_txt`` [N, k, d]
holds ``k`` more captions per pair, gathered with the rows. They are candidates of every image
anchor's image -> text direction (never anchors, never positives, never in an anchor's group):
the caption pool of an image anchor is ``N + N k`` captions.

Pure torch; the one collective is in :mod:`raycmr.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raycmr import distributed

ANCHOR_MODES = ("global", "local", "auto")

#: ``auto`` scores N x N up to this many workers and local anchors beyond: at W = 2 both modes
#: do the same similarity FLOPs (one N x N matmul vs two B x N) and local adds a backward
#: collective; from W = 3 on local does 2/W of global's FLOPs (bench_loss_scaling.py).
AUTO_GLOBAL_MAX_WORKERS = 2


def resolve_anchors(mode: str, world: int) -> str:
    """``global`` or ``local`` for ``loss.anchors=mode`` at ``world`` workers."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"loss.anchors is {mode!r}; choose one of {', '.join(ANCHOR_MODES)}")
    if mode == "auto":
        return "global" if world <= AUTO_GLOBAL_MAX_WORKERS else "local"
    return mode


def explain_anchors(mode: str, world: int) -> str:
    """What ``loss.anchors=mode`` resolves to at ``world`` workers, and why, e.g.
    ``"global (auto: 2 workers <= 2)"``."""
    chosen = resolve_anchors(mode, world)
    if mode != "auto":
        return f"{chosen} (loss.anchors={mode})"
    workers = f"{world} worker{'s' if world != 1 else ''}"
    sign = "<=" if chosen == "global" else ">"
    return f"{chosen} (auto: {workers} {sign} {AUTO_GLOBAL_MAX_WORKERS})"


@dataclass(frozen=True)
class GlobalBatch:
    """The matched pairs a contrastive loss scores, and which of them are its anchors.

    ``img``, ``txt`` [N, d]: every worker's pairs in rank order (candidates of every anchor);
    ``groups`` [N] (or None: every pair its own group): pairs of one group are never negatives
    of each other. The anchors are rows ``start .. stop`` (default: all N); a loss returns the
    SUM over its anchors divided by ``denominator`` (default: the number of anchors, a mean).
    ``sizes``: rows contributed by each worker, in rank order (``(N,)`` in one process).
    ``extra_txt`` [N, k, d] (or None): extra caption candidates of the image anchors (module
    docstring).
    """

    img: torch.Tensor
    txt: torch.Tensor
    groups: torch.Tensor | None = None
    start: int = 0
    stop: int | None = None
    denominator: float | None = None
    sizes: tuple[int, ...] = ()
    extra_txt: torch.Tensor | None = None

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

    @property
    def extra_count(self) -> int:
        """Extra caption candidates in all (``N k``)."""
        return 0 if self.extra_txt is None else self.extra_txt.shape[0] * self.extra_txt.shape[1]

    def captions(self) -> torch.Tensor:
        """Every caption candidate of an image anchor: the ``N`` pairs' then the extra ones."""
        if self.extra_txt is None:
            return self.txt
        return torch.cat([self.txt, self.extra_txt.reshape(-1, self.txt.shape[1])])

    def scale(self) -> float:
        return float(self.anchor_count if self.denominator is None else self.denominator)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the embeddings' dtype when wider (float64 in the exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


def local_batch(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor | None = None,
                extra_txt: torch.Tensor | None = None) -> GlobalBatch:
    """The global batch of one worker alone (``loss.global_negatives=false``, or one worker)."""
    return GlobalBatch(img, txt, groups, sizes=(int(img.shape[0]),), extra_txt=extra_txt)


def global_batch(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor | None,
                 pad_rows: int, anchors: str = "global",
                 extra_txt: torch.Tensor | None = None) -> GlobalBatch:
    """Every worker's ``(img, txt, groups, extra_txt)`` in rank order from ONE all_gather, with
    the anchors of ``anchors`` (``global`` or ``local``, module docstring).

    ``pad_rows``: the same on every rank, at least any rank's row count (``train.batch_size``);
    row counts may differ by rank (bad rows dropped), down to 0. In a world of 1: the tensors
    themselves. The gather carries the embeddings' dtype (bf16 halves its bytes); the loss is
    computed in float32 (or the embeddings' dtype when wider).
    """
    world = distributed.world_size()
    if world == 1:
        wide = _loss_dtype(img.dtype)
        return local_batch(img.to(wide), txt.to(wide), groups,
                           None if extra_txt is None else extra_txt.to(wide))
    if anchors not in ("global", "local"):
        raise ValueError(f"anchors must be 'global' or 'local' here, got {anchors!r}")
    rows, dim = int(img.shape[0]), int(img.shape[1])
    cols = [img, txt.to(img.dtype)]
    if extra_txt is not None:
        cols.append(extra_txt.to(img.dtype).flatten(1))
    ids = groups.reshape(rows, 1) if groups is not None else None
    floats, gathered_ids, sizes = distributed.gather_rows(
        torch.cat(cols, dim=1), ids, pad_rows, same_loss=anchors == "global")
    floats = floats.to(_loss_dtype(floats.dtype))
    total = sum(sizes)
    extra = None
    if extra_txt is not None:
        extra = floats[:, 2 * dim:].reshape(total, extra_txt.shape[1], dim)
    batch = GlobalBatch(floats[:, :dim], floats[:, dim:2 * dim],
                        gathered_ids[:, 0] if groups is not None else None,
                        denominator=float(max(total, 1)), sizes=sizes, extra_txt=extra)
    if anchors == "global":
        return batch
    start = sum(sizes[:distributed.rank()])
    return GlobalBatch(batch.img, batch.txt, batch.groups, start=start, stop=start + rows,
                       denominator=max(total, 1) / world, sizes=sizes, extra_txt=extra)
