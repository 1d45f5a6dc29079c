"""Contrastive losses on a batch of matched (image, caption) pairs, with global negatives.

Anchors are this worker's pairs ``(img[i], txt[i])``; candidates are the pairs of the global batch
(``img_all``, ``txt_all``: every worker's embeddings, gathered with gradient), in which anchor
``i`` sits at row ``offset + i``. In a single process ``img_all is img`` and ``offset = 0``.
Candidates in the anchor's ``group`` (captions of the same ``image_id``, the anchor's own pair
included) are never negatives.

Every function returns the SUM over its anchors divided by ``denominator`` (default: the local
anchor count). A trainer with ``W`` workers passes ``denominator = N_global / W`` so that the
optimizer's average over workers equals the mean over the global batch: ``N`` workers x batch
``B`` then behave exactly as 1 worker x batch ``N*B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    hardest_neg_sim: torch.Tensor  # mean over anchors and both directions (no grad)
    pos_sim: torch.Tensor  # mean positive-pair similarity (no grad)


def _negative_mask(
    rows: int, groups: torch.Tensor | None, groups_all: torch.Tensor | None, offset: int, cols: int,
    device: torch.device,
) -> torch.Tensor:
    """Bool [rows, cols]: True where candidate j may serve as a negative of anchor i."""
    if groups is None or groups_all is None:
        mask = torch.ones(rows, cols, dtype=torch.bool, device=device)
        idx = torch.arange(rows, device=device)
        mask[idx, idx + offset] = False
        return mask
    return groups[:, None] != groups_all[None, :]


def _resolve(img, txt, img_all, txt_all, groups, groups_all):
    img_all = img if img_all is None else img_all
    txt_all = txt if txt_all is None else txt_all
    if groups is not None and groups_all is None:
        groups_all = groups
    return img_all, txt_all, groups_all


def vse_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    img_all: torch.Tensor | None = None,
    txt_all: torch.Tensor | None = None,
    offset: int = 0,
    groups: torch.Tensor | None = None,
    groups_all: torch.Tensor | None = None,
    margin: float = 0.2,
    hardest: bool = True,
    denominator: float | None = None,
) -> ContrastiveOutput:
    """VSE++ hinge-based triplet ranking loss (Faghri et al., BMVC 2018).

    With ``s(a, b)`` the similarity (dot product of L2-normalised embeddings) and positive pair
    ``(i, c)``, for each anchor pair::

        MH (hardest=True):  max_{c'} [m + s(i, c') - s(i, c)]_+  +  max_{i'} [m + s(i', c) - s(i, c)]_+
        SH (hardest=False): sum_{c'} [m + s(i, c') - s(i, c)]_+  +  sum_{i'} [m + s(i', c) - s(i, c)]_+

    where ``c'`` ranges over the global batch's captions and ``i'`` over its images that are not
    in the anchor's group. MH is the max of hinges over the hardest negative; SH the sum of hinges.
    """
    img_all, txt_all, groups_all = _resolve(img, txt, img_all, txt_all, groups, groups_all)
    rows = img.shape[0]
    pos = (img * txt).sum(dim=1)  # s(i, c) of each anchor pair
    s_i2t = img @ txt_all.t()  # anchor image vs every caption
    s_t2i = txt @ img_all.t()  # anchor caption vs every image
    neg = _negative_mask(rows, groups, groups_all, offset, txt_all.shape[0], img.device)
    cost_c = (margin + s_i2t - pos[:, None]).clamp(min=0).masked_fill(~neg, 0.0)
    cost_i = (margin + s_t2i - pos[:, None]).clamp(min=0).masked_fill(~neg, 0.0)
    if hardest:
        per_anchor = cost_c.max(dim=1).values + cost_i.max(dim=1).values
    else:
        per_anchor = cost_c.sum(dim=1) + cost_i.sum(dim=1)
    denom = float(rows) if denominator is None else float(denominator)
    with torch.no_grad():
        hard = torch.cat([
            s_i2t.masked_fill(~neg, float("-inf")).max(dim=1).values,
            s_t2i.masked_fill(~neg, float("-inf")).max(dim=1).values,
        ])
        hard = hard[torch.isfinite(hard)]
        hard_mean = hard.mean() if hard.numel() else torch.zeros((), device=img.device)
    return ContrastiveOutput(per_anchor.sum() / denom, hard_mean, pos.detach().mean())


def infonce_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    img_all: torch.Tensor | None = None,
    txt_all: torch.Tensor | None = None,
    offset: int = 0,
    groups: torch.Tensor | None = None,
    groups_all: torch.Tensor | None = None,
    denominator: float | None = None,
) -> ContrastiveOutput:
    """Symmetric InfoNCE (CLIP; van den Oord et al. 2018) with learnable temperature::

        L = 1/2 * ( -log softmax_j(t * s(i, c_j))[c] - log softmax_j(t * s(i_j, c))[i] )

    with ``t = exp(logit_scale)``. Other members of the anchor's group are removed from the
    softmax (they are neither negatives nor the target).
    """
    img_all, txt_all, groups_all = _resolve(img, txt, img_all, txt_all, groups, groups_all)
    rows = img.shape[0]
    scale = logit_scale.exp()
    target = torch.arange(rows, device=img.device) + offset
    neg = _negative_mask(rows, groups, groups_all, offset, txt_all.shape[0], img.device)
    keep = neg.clone()
    keep[torch.arange(rows, device=img.device), target] = True
    logits_i2t = (scale * img @ txt_all.t()).masked_fill(~keep, float("-inf"))
    logits_t2i = (scale * txt @ img_all.t()).masked_fill(~keep, float("-inf"))
    per_anchor = 0.5 * (
        F.cross_entropy(logits_i2t, target, reduction="none")
        + F.cross_entropy(logits_t2i, target, reduction="none")
    )
    denom = float(rows) if denominator is None else float(denominator)
    with torch.no_grad():
        s_i2t = img @ txt_all.t()
        hard = s_i2t.masked_fill(~neg, float("-inf")).max(dim=1).values
        hard = hard[torch.isfinite(hard)]
        hard_mean = hard.mean() if hard.numel() else torch.zeros((), device=img.device)
    return ContrastiveOutput(per_anchor.sum() / denom, hard_mean, (img * txt).sum(1).mean().detach())
