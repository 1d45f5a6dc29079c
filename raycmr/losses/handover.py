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

from raycmr.distributed import GlobalBatch
from raycmr.losses.contrastive import ContrastiveOutput, infonce_loss, vse_loss

WARMUP_LOSSES = ("none", "vse_sh", "infonce")


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
) -> ContrastiveOutput:
    """``(1 - weight) * L_warm + weight * L_MH`` over ``batch`` (module docstring);
    ``logit_scale`` is needed by the InfoNCE warm-up."""
    if warmup not in WARMUP_LOSSES:
        raise ValueError(f"warm-up loss {warmup!r}; choose one of {', '.join(WARMUP_LOSSES)}")
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
