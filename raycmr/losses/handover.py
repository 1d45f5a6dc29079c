"""VSE++ max-of-hinges that trains from random initialisation: a warm-up loss handed over to MH.

From random initialisation, the hardest in-batch negative of VSE++'s max-of-hinges (MH) is as
close to the anchor as its positive; the only gradient pulls every embedding together, and the
run collapses to one point where every hinge equals the margin (loss ``2 x margin``). Faghri et
al. (VSE++, BMVC 2018, sec. 3.3 and 4.1) note MH needs a reasonable starting point and start from
pre-trained features; here a warm-up loss that sees every negative (sum-of-hinges, or InfoNCE)
shapes the space first and hands over to MH smoothly::

    L(p) = (1 - w(p)) * L_warm + w(p) * L_MH

    w(p) = 0                                         p <= start
           (1 - cos(pi * (p - start) / (end - start))) / 2   start < p < end
           1                                         p >= end

where ``p`` in [0, 1] is the training progress (optimizer steps done / total steps), ``L_warm`` is
VSE++ sum-of-hinges (``vse_sh``) or symmetric InfoNCE (``infonce``) over the same (global) batch,
and ``L_MH`` the plain VSE++ max-of-hinges. Once the hand-over is finished (``w = 1``) this is
exactly MH; before it starts (``w = 0``) exactly the warm-up loss. The reported hardest-negative
and positive similarities are MH's.
"""

from __future__ import annotations

import math

import torch

from raycmr.losses.batch import GlobalBatch
from raycmr.losses.contrastive import (
    ContrastiveOutput,
    anchor_similarities,
    infonce_loss,
    negative_masks,
    vse_loss,
)

WARMUP_LOSSES = ("none", "vse_sh", "infonce", "soft")


def smooth_mh_loss(batch: GlobalBatch, *, margin: float, tau: float) -> ContrastiveOutput:
    """VSE++ max-of-hinges with its max and hinge smoothed at temperature ``tau``::

        per direction:  tau * log(1 + sum_{j neg} exp((m + s_j - s_p) / tau))

    a softplus of the log-sum-exp of the hinges' arguments. As ``tau -> 0`` it tends to
    ``[max_j (m + s_j - s_p)]_+``, which is MH's hinge on the hardest negative (``tau = 0`` is
    exactly :func:`vse_loss` with ``hardest=True``); at ``tau = 1/t`` it is ``tau`` times InfoNCE
    with logit scale ``t`` and an additive margin (its ``log(1 + sum)`` form). Annealing ``tau``
    to 0 therefore moves from a margin-InfoNCE that sees every negative to the hardest one.
    """
    if tau <= 0:
        return vse_loss(batch, margin=margin, hardest=True)
    a = batch.anchors
    img, txt = batch.img[a], batch.txt[a]
    pos = (img * txt).sum(dim=1)
    zero = pos.new_zeros(pos.shape[0], 1)
    per_anchor = pos.new_zeros(pos.shape[0])
    hard = []
    for sims, neg in zip(anchor_similarities(batch), negative_masks(batch)):
        z = ((margin + sims - pos[:, None]) / tau).masked_fill(~neg, float("-inf"))
        per_anchor = per_anchor + tau * torch.logsumexp(torch.cat([zero, z], dim=1), dim=1)
        with torch.no_grad():
            hard.append(sims.masked_fill(~neg, float("-inf")).max(dim=1).values)
    h = torch.cat(hard)
    h = h[torch.isfinite(h)]
    hard_mean = h.mean() if h.numel() else pos.new_zeros(())
    return ContrastiveOutput(per_anchor.sum() / batch.scale(), hard_mean, pos.detach().mean())


def handover_weight(progress: float, start: float, end: float) -> float:
    """The weight ``w(p)`` of MH: 0 up to ``start``, a half-cosine ramp, 1 from ``end`` on."""
    if progress >= end:
        return 1.0
    if progress <= start:
        return 0.0
    return 0.5 * (1.0 - math.cos(math.pi * (progress - start) / (end - start)))


def vse_mh_handover_loss(
    batch: GlobalBatch,
    *,
    warmup: str,
    weight: float,
    margin: float = 0.2,
    logit_scale: torch.Tensor | None = None,
    tau: float = 0.05,
) -> ContrastiveOutput:
    """``(1 - weight) * L_warm + weight * L_MH`` over ``batch`` (module docstring);
    ``logit_scale`` is needed by the InfoNCE warm-up."""
    if warmup not in WARMUP_LOSSES:
        raise ValueError(f"warm-up loss {warmup!r}; choose one of {', '.join(WARMUP_LOSSES)}")
    if warmup == "soft":
        return smooth_mh_loss(batch, margin=margin, tau=tau * (1.0 - weight))
    mh = vse_loss(batch, margin=margin, hardest=True) if weight > 0 or warmup == "none" \
        else None
    if warmup == "none" or weight >= 1:
        assert mh is not None
        return mh
    if warmup == "vse_sh":
        warm = vse_loss(batch, margin=margin, hardest=False)
    else:
        if logit_scale is None:
            raise ValueError("the InfoNCE warm-up needs the model's logit_scale")
        warm = infonce_loss(batch, logit_scale)
    if mh is None:
        return warm
    return ContrastiveOutput((1.0 - weight) * warm.loss + weight * mh.loss, mh.hardest_neg_sim,
                             mh.pos_sim)
