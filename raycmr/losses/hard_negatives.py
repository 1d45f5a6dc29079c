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

The negatives come from every worker (:func:`gather_hard_negatives`, the same rank order and
padding as :func:`raycmr.distributed.gather_global_batch`), so the loss each rank computes is the
single-process loss of the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycmr import distributed
from raycmr.distributed import GlobalBatch
from raycmr.losses.contrastive import (
    ContrastiveOutput,
    anchor_similarities,
    clamped_logit_scale,
    negative_mask,
)


def gather_hard_negatives(neg_txt: torch.Tensor, neg_valid: torch.Tensor, pad_rows: int,
                          sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's ``neg_txt`` [rows, k, d] (with gradient) and ``neg_valid`` [rows, k], in
    rank order, rows aligned with the :class:`GlobalBatch` whose per-rank ``sizes`` are given.
    In a world of 1: the tensors themselves."""
    if distributed.world_size() == 1:
        return neg_txt, neg_valid
    rows, k, dim = neg_txt.shape
    packed = torch.cat([neg_txt.reshape(rows, k * dim),
                        neg_valid.to(neg_txt.dtype).reshape(rows, k)], dim=1)
    gathered = distributed._PackedGather.apply(packed, pad_rows)
    keep = torch.cat([torch.arange(r * pad_rows, r * pad_rows + n, device=neg_txt.device)
                      for r, n in enumerate(sizes)])
    rows_all = gathered.index_select(0, keep)
    return rows_all[:, :k * dim].reshape(-1, k, dim), rows_all[:, k * dim:].detach() > 0.5


def infonce_hard_negatives_loss(batch: GlobalBatch, neg_txt: torch.Tensor,
                                neg_valid: torch.Tensor, logit_scale: torch.Tensor
                                ) -> ContrastiveOutput:
    """The module docstring's loss over ``batch``'s anchors; ``neg_txt`` [N, k, d] and
    ``neg_valid`` [N, k] are aligned with the batch's rows (``gather_hard_negatives``)."""
    a = batch.anchors
    n = batch.anchor_count
    device = batch.img.device
    t = clamped_logit_scale(logit_scale).exp()
    own = torch.arange(n, device=device) + a.start
    candidates = negative_mask(batch)
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
