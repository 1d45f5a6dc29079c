"""Contrastive losses on a batch of matched (image, caption) pairs, with global negatives.

Every loss takes a :class:`~raycmr.losses.batch.GlobalBatch`: the candidates are all its pairs
(every worker's embeddings in a multi-worker run, gathered by
:func:`~raycmr.losses.batch.global_batch`) and its extra captions, the anchors its rows
``start .. stop`` (all rows, or one worker's own rows under ``loss.anchors=local``); anchor
``i`` is candidate row ``i``. Candidates in the anchor's ``group`` (captions of the same
``image_id``, the anchor's own pair included) are never negatives; extra captions always are.

Every function returns the SUM over its anchors divided by ``batch.denominator`` (default: the
anchor count). Summed over the workers' anchor slices (or computed whole by each) that is the
single-process loss of the concatenated batch (:mod:`raycmr.losses.batch` explains the
gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycmr.losses.batch import GlobalBatch

#: CLIP clips its learnable logit scale at ln(100): logits are never scaled by more than 100.
MAX_LOGIT_SCALE = math.log(100.0)


def clamped_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """``min(logit_scale, ln 100)`` (Radford et al. 2021, sec. 2.5): the inverse temperature
    ``exp(logit_scale)`` stays <= 100 however far the optimizer pushes the parameter."""
    return logit_scale.clamp(max=MAX_LOGIT_SCALE)


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    hardest_neg_sim: torch.Tensor  # mean over anchors and both directions (no grad)
    pos_sim: torch.Tensor  # mean positive-pair similarity (no grad)


def same_group_mask(batch: GlobalBatch) -> torch.Tensor:
    """Bool [anchors, N]: True where pair j shows anchor i's own content (its group, the
    anchor's own pair included): never a negative."""
    a = batch.anchors
    if batch.groups is None:
        mask = torch.zeros(batch.anchor_count, batch.rows, dtype=torch.bool,
                           device=batch.img.device)
        idx = torch.arange(batch.anchor_count, device=batch.img.device)
        mask[idx, idx + a.start] = True
        return mask
    return batch.groups[a, None] == batch.groups[None, :]


def mask_own_group_(sims: torch.Tensor, batch: GlobalBatch) -> torch.Tensor:
    """``sims`` [anchors, N (+ extra captions)] with every pair of the anchor's own group set to
    -inf, in place (extra captions are never masked). When every row is its own group (the
    usual batch: one caption per image) that is the anchor's own pair alone, a diagonal: O(N)
    instead of an [anchors, N] mask and fill."""
    a = batch.anchors
    groups = batch.groups
    pairs = sims[:, :batch.rows]
    if groups is None or torch.unique(groups).numel() == groups.numel():
        pairs[:, a.start:a.stop].diagonal().fill_(float("-inf"))
    else:
        pairs.masked_fill_(same_group_mask(batch), float("-inf"))
    return sims


def negative_masks(batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(captions [anchors, N + extra], images [anchors, N])``: True where a candidate may
    serve as a negative of the anchor image (a caption) or of the anchor caption (an image)."""
    neg = ~same_group_mask(batch)
    if not batch.extra_count:
        return neg, neg
    extra = neg.new_ones((batch.anchor_count, batch.extra_count))
    return torch.cat([neg, extra], dim=1), neg


def _whole(batch: GlobalBatch) -> bool:
    """Every row an anchor and no extra captions: image->text is text->image transposed."""
    return batch.anchor_count == batch.rows and not batch.extra_count


def anchor_similarities(batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_i2t [anchors, N + extra], s_t2i [anchors, N])``: every anchor image against every
    caption candidate and every anchor caption against every image. When all rows are anchors
    (every worker computes the whole global loss) ``s_t2i`` is ``s_i2t``'s transpose: one
    matmul, not two."""
    a = batch.anchors
    img, txt = batch.img[a], batch.txt[a]
    s_i2t = img @ batch.captions().t()
    if _whole(batch):
        return s_i2t, s_i2t.t()
    return s_i2t, txt @ batch.img.t()


@torch.no_grad()
def _hardest_negatives(batch: GlobalBatch
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, column)`` of each anchor image's hardest caption candidate and ``(s, row)`` of each
    anchor caption's hardest image, among candidates outside the anchor's group (``s = -inf``
    where there is none)."""
    a = batch.anchors
    masked = mask_own_group_(batch.img[a] @ batch.captions().t(), batch)
    hard_c, col_c = masked.max(dim=1)
    if not _whole(batch):
        masked = mask_own_group_(batch.txt[a] @ batch.img.t(), batch)
        hard_i, col_i = masked.max(dim=1)
        return hard_c, col_c, hard_i, col_i
    # all rows are anchors: the mask is symmetric and each caption's candidates are a column.
    # A column max with its index is slow on CPU (strided); the values alone are fast, and
    # the row holding each column's max is found by comparison (any row of a tie).
    hard_i = masked.amax(dim=0)
    rows, cols = (masked == hard_i[None, :]).nonzero(as_tuple=True)
    col_i = torch.zeros_like(col_c)
    col_i[cols] = rows
    return hard_c, col_c, hard_i, col_i


def vse_loss(batch: GlobalBatch, *, margin: float = 0.2, hardest: bool = True
             ) -> ContrastiveOutput:
    """VSE++ hinge-based triplet ranking loss (Faghri et al., BMVC 2018).

    With ``s(a, b)`` the similarity (dot product of L2-normalised embeddings) and positive pair
    ``(i, c)``, for each anchor pair::

        MH (hardest=True):  max_{c'} [m + s(i, c') - s(i, c)]_+  +  max_{i'} [m + s(i', c) - s(i, c)]_+
        SH (hardest=False): sum_{c'} [m + s(i, c') - s(i, c)]_+  +  sum_{i'} [m + s(i', c) - s(i, c)]_+

    where ``c'`` ranges over the global batch's captions and ``i'`` over its images that are not
    in the anchor's group. MH is the max of hinges over the hardest negative; SH the sum of hinges.

    MH's gradient reaches only each anchor's positive and its hardest negatives, so the hardest
    negatives are found without autograd (one masked similarity matrix, its row and column
    maxima) and their similarities recomputed as dot products with gradient: the backward is
    O(N d), not O(N^2), and the value is the same (the max of hinges is the hinge of the max).
    """
    a = batch.anchors
    img, txt = batch.img[a], batch.txt[a]
    pos = (img * txt).sum(dim=1)  # s(i, c) of each anchor pair
    if hardest:
        hard_c, col_c, hard_i, col_i = _hardest_negatives(batch)
        s_c = (img * batch.captions()[col_c]).sum(dim=1)  # s(i, c'): the image's hardest caption
        s_i = (txt * batch.img[col_i]).sum(dim=1)  # s(i', c): the anchor caption's hardest image
        zero = pos.new_zeros(())
        per_anchor = (torch.where(torch.isfinite(hard_c), (margin + s_c - pos).clamp(min=0), zero)
                      + torch.where(torch.isfinite(hard_i), (margin + s_i - pos).clamp(min=0),
                                    zero))
        hard = torch.cat([hard_c, hard_i])
    else:
        neg_c, neg_i = negative_masks(batch)
        s_i2t, s_t2i = anchor_similarities(batch)
        cost_c = (margin + s_i2t - pos[:, None]).clamp(min=0).masked_fill(~neg_c, 0.0)
        cost_i = (margin + s_t2i - pos[:, None]).clamp(min=0).masked_fill(~neg_i, 0.0)
        per_anchor = cost_c.sum(dim=1) + cost_i.sum(dim=1)
        with torch.no_grad():
            hard = torch.cat([s_i2t.masked_fill(~neg_c, float("-inf")).max(dim=1).values,
                              s_t2i.masked_fill(~neg_i, float("-inf")).max(dim=1).values])
    with torch.no_grad():
        hard = hard[torch.isfinite(hard)]
        hard_mean = hard.mean() if hard.numel() else torch.zeros((), device=img.device)
    return ContrastiveOutput(per_anchor.sum() / batch.scale(), hard_mean, pos.detach().mean())


def infonce_loss(batch: GlobalBatch, logit_scale: torch.Tensor) -> ContrastiveOutput:
    """Symmetric InfoNCE (CLIP; van den Oord et al. 2018) with learnable temperature::

        L = 1/2 * ( -log softmax_j(t * s(i, c_j))[c] - log softmax_j(t * s(i_j, c))[i] )

    with ``t = exp(min(logit_scale, ln 100))`` (:func:`clamped_logit_scale`). Other members of the anchor's group are removed from the
    softmax (they are neither negatives nor the target).
    """
    a = batch.anchors
    img, txt = batch.img[a], batch.txt[a]
    rows = batch.anchor_count
    scale = clamped_logit_scale(logit_scale).exp()
    target = torch.arange(rows, device=img.device) + a.start
    neg_c, neg_i = negative_masks(batch)
    keep_c, keep_i = neg_c.clone(), neg_i.clone()
    keep_c[torch.arange(rows, device=img.device), target] = True
    keep_i[torch.arange(rows, device=img.device), target] = True
    s_i2t, s_t2i = anchor_similarities(batch)
    logits_i2t = (scale * s_i2t).masked_fill(~keep_c, float("-inf"))
    logits_t2i = (scale * s_t2i).masked_fill(~keep_i, float("-inf"))
    per_anchor = 0.5 * (
        F.cross_entropy(logits_i2t, target, reduction="none")
        + F.cross_entropy(logits_t2i, target, reduction="none")
    )
    with torch.no_grad():
        hard = s_i2t.masked_fill(~neg_c, float("-inf")).max(dim=1).values
        hard = hard[torch.isfinite(hard)]
        hard_mean = hard.mean() if hard.numel() else torch.zeros((), device=img.device)
    return ContrastiveOutput(per_anchor.sum() / batch.scale(), hard_mean,
                             (img * txt).sum(1).mean().detach())


def contrastive_loss(kind: str, batch: GlobalBatch, *, margin: float,
                     logit_scale: torch.Tensor) -> ContrastiveOutput:
    """The loss ``loss.kind`` names: ``vse_mh``, ``vse_sh`` or ``infonce``."""
    if kind == "infonce":
        return infonce_loss(batch, logit_scale)
    return vse_loss(batch, margin=margin, hardest=kind == "vse_mh")
