"""Modality adversary loss: a gradient reversal layer (GRL), its schedule, the adversary loss.

Adversarial cross-modal learning (ACMR, Wang et al., ACM MM 2017) trains a discriminator to tell
image embeddings from text embeddings while the encoders, through a gradient reversal layer
(Ganin & Lempitsky, ICML 2015, "Unsupervised Domain Adaptation by Backpropagation"), learn to make
the two modalities indistinguishable. The discriminator minimises its cross-entropy; the encoders
below the GRL receive ``-lambda`` times that gradient, i.e. they maximise it.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

GRL_SCHEDULES = ("constant", "dann", "dynamic")


class GradReverse(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-lambd`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """``x`` unchanged forward; gradient ``-lambd * dL/dx`` backward."""
    return GradReverse.apply(x, lambd)


def grl_lambda(
    schedule: str,
    *,
    progress: float = 0.0,
    samples_seen: int = 0,
    lambda_: float = 1.0,
    gamma: float = 10.0,
    alpha: float = 1.0,
    ramp_samples: int = 100_000,
) -> float:
    """The GRL coefficient ``lambda`` at a point of training.

    ``"constant"``: ``lambda = lambda_``.

    ``"dann"`` (Ganin & Lempitsky 2015, Sec. 5.2.2, with ``alpha`` as the ceiling)::

        lambda = alpha * (2 / (1 + exp(-gamma * p)) - 1),   p = progress clipped to [0, 1]

    which rises from 0 at ``p = 0`` towards ``alpha * tanh(gamma / 2)`` at ``p = 1``.

    ``"dynamic"``: driven by the number of training instances seen so far (all workers)::

        lambda = alpha * min(1, samples_seen / ramp_samples)

    a linear ramp from 0 to the ceiling ``alpha``, reached after ``ramp_samples`` instances.
    Unlike ``"dann"`` it needs no total length of training, so it behaves the same when the run is
    resumed, extended or stopped early by a scheduler.
    """
    if schedule == "constant":
        return float(lambda_)
    if schedule == "dann":
        p = min(1.0, max(0.0, float(progress)))
        return float(alpha) * (2.0 / (1.0 + math.exp(-float(gamma) * p)) - 1.0)
    if schedule == "dynamic":
        if ramp_samples <= 0:
            raise ValueError(f"grl ramp_samples must be positive, got {ramp_samples}")
        return float(alpha) * min(1.0, max(0, samples_seen) / float(ramp_samples))
    raise ValueError(f"unknown GRL schedule {schedule!r}; choose one of {', '.join(GRL_SCHEDULES)}")


def modality_adversary_loss(
    disc: nn.Module,
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of telling images (label 0) from texts (label 1) on grad-reversed embeddings.

    ::

        L = -1/(N_i + N_t) * ( sum_i log D(r(u_i))[0] + sum_t log D(r(v_t))[1] ),  r = GRL(lambd)

    With one logit ``D(x)[1] = sigmoid(logit)`` (binary cross-entropy). Minimising ``L`` trains the
    discriminator; the encoders receive ``-lambd * dL/d(embedding)``, pushing the modalities
    together. Returns ``(loss, accuracy)``; ``accuracy`` is a detached float tensor, the fraction
    of embeddings whose modality the discriminator gets right (0.5 = chance).
    """
    feats = torch.cat([img_emb, txt_emb], dim=0)
    target = torch.cat([
        torch.zeros(img_emb.shape[0], dtype=torch.long, device=feats.device),
        torch.ones(txt_emb.shape[0], dtype=torch.long, device=feats.device),
    ])
    logits = disc(grad_reverse(feats, lambd))
    if logits.dim() == 2 and logits.shape[1] == 2:
        loss = F.cross_entropy(logits, target)
        pred = logits.argmax(dim=1)
    else:
        logit = logits.reshape(-1)
        if logit.shape[0] != feats.shape[0]:
            raise ValueError(
                f"discriminator must return [N, 2] or [N, 1] logits, got {tuple(logits.shape)}"
            )
        loss = F.binary_cross_entropy_with_logits(logit, target.to(logit.dtype))
        pred = (logit > 0).long()
    with torch.no_grad():
        accuracy = (pred == target).float().mean()
    return loss, accuracy
