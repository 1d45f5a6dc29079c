"""InfoNCE with compositional hard negatives (NegCLIP: Yuksekgonul et al., ICLR 2023).

Each caption ``c_i`` of the global batch brings up to ``k`` perturbed captions ``h_i1 .. h_ik``
(raycmr/data/perturb.py: two objects' attributes swapped, a word replaced). They are extra
candidates of ``c_i``'s own image in the image->text direction::

    L = 1/2 * ( -log [ e^{t s(i, c_i)} / (sum_{j} e^{t s(i, c_j)} + sum_{m valid} e^{t s(i, h_im)}) ]
                -log softmax_j(t * s(i_j, c_i))[i] )

with ``t = exp(min(logit_scale, ln 100))``; the text->image direction is plain InfoNCE (a
perturbed caption describes no image of the batch). Missing perturbations (``valid`` False) are
left out; a caption with none keeps its in-batch negatives only. Members of the anchor's group
are removed from both softmaxes, as in :func:`raycmr.losses.contrastive.infonce_loss`.

The negatives come from every worker in the batch's own gather (``extra_txt`` of
:func:`raycmr.losses.batch.global_batch`), so with global or local anchors the loss equals the
single-process loss of the concatenated batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from raycmr.losses.batch import GlobalBatch
from raycmr.losses.contrastive import (
    ContrastiveOutput,
    anchor_similarities,
    clamped_logit_scale,
    negative_masks,
)


def infonce_own_hard_negatives_loss(batch: GlobalBatch, logit_scale: torch.Tensor
                                    ) -> ContrastiveOutput:
    """The module docstring's loss over a batch whose ``extra_txt`` [N, k, d] holds each pair's
    perturbed captions, a missing one as the zero vector (gathered with the rows by
    :func:`raycmr.losses.batch.global_batch`)."""
    neg_txt = batch.extra_txt
    if neg_txt is None:
        raise ValueError("the batch carries no hard-negative captions (extra_txt)")
    valid = neg_txt.detach().abs().amax(dim=-1) > 0
    return infonce_hard_negatives_loss(replace(batch, extra_txt=None), neg_txt, valid,
                                       logit_scale)


def infonce_hard_negatives_loss(batch: GlobalBatch, neg_txt: torch.Tensor,
                                neg_valid: torch.Tensor, logit_scale: torch.Tensor
                                ) -> ContrastiveOutput:
    """The module docstring's loss over ``batch``'s anchors; ``neg_txt`` [N, k, d] and
    ``neg_valid`` [N, k] are aligned with the batch's rows (the batch itself has no extra_txt)."""
    a = batch.anchors
    n = batch.anchor_count
    device = batch.img.device
    t = clamped_logit_scale(logit_scale).exp()
    own = torch.arange(n, device=device) + a.start
    candidates = negative_masks(batch)[0]
    candidates[torch.arange(n, device=device), own] = True
    s_i2t, s_t2i = anchor_similarities(batch)
    s_hard = torch.einsum("nd,nkd->nk", batch.img[a], neg_txt[a].to(batch.img.dtype))
    hard_ok = neg_valid[a].bool()
    i2t = torch.cat([s_i2t.masked_fill(~candidates, float("-inf")),
                     s_hard.masked_fill(~hard_ok, float("-inf"))], dim=1)
    t2i = s_t2i.masked_fill(~candidates, float("-inf"))
    per_anchor = F.cross_entropy(t * i2t, own, reduction="none") \
        + F.cross_entropy(t * t2i, own, reduction="none")
    with torch.no_grad():
        pos = (batch.img[a] * batch.txt[a]).sum(1)
        hard = s_hard.masked_fill(~hard_ok, float("-inf")).amax(1) if s_hard.shape[1] else pos
        hard = hard[torch.isfinite(hard)]
        hard_mean = hard.mean() if hard.numel() else pos.new_zeros(())
    return ContrastiveOutput(0.5 * per_anchor.sum() / batch.scale(), hard_mean, pos.mean())
