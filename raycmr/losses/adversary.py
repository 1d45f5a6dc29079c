"""Modality adversary losses: the two-player confusion update, the gradient reversal layer (GRL)
and the schedule of their coefficient ``lambda``.

Adversarial cross-modal learning (ACMR, Wang et al., ACM MM 2017) trains a discriminator to tell
image embeddings from text embeddings while the encoders learn to make the two modalities
indistinguishable. Two updates (``loss.grl.update``):

- ``"confusion"`` (:func:`modality_confusion_losses`): a two-player update. The discriminator
  minimises its cross-entropy on *detached* embeddings; the encoders minimise the confusion loss
  ``KL(uniform || D(x))`` against the discriminator's current (frozen) weights, i.e. they are
  pushed to make it output 0.5 for both modalities (the "fool the classifier into chance" target
  of ACMR's modality classifier and of Tzeng et al., ICCV 2015, "Simultaneous Deep Transfer Across
  Domains and Tasks"). It is bounded below by 0 at chance, so the encoders gain nothing by
  swapping the modalities' sides.
- ``"reversal"`` (:func:`modality_adversary_loss`): one reversed gradient (Ganin & Lempitsky,
  ICML 2015, "Unsupervised Domain Adaptation by Backpropagation"). The encoders below the GRL
  receive ``-lambda`` times the discriminator's gradient, i.e. they *maximise* its cross-entropy,
  which is unbounded: a discriminator that is confidently wrong scores best, so the encoders
  swap the modalities' sides instead of mixing them (accuracy ends at 0 or 1, not 0.5).

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
    logits = two_way_logits(disc(grad_reverse(feats, lambd)), feats.shape[0])
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == target).float().mean()
    return loss, accuracy


def two_way_logits(logits: torch.Tensor, rows: int) -> torch.Tensor:
    """``[N, 2]`` softmax logits (image, text) from a discriminator's ``[N, 2]`` or ``[N, 1]``
    output (one logit ``l``: ``(0, l)``, whose softmax is ``(1 - sigmoid(l), sigmoid(l))``)."""
    if logits.dim() == 2 and logits.shape[1] == 2:
        return logits
    logit = logits.reshape(-1)
    if logit.shape[0] != rows:
        raise ValueError(
            f"discriminator must return [N, 2] or [N, 1] logits, got {tuple(logits.shape)}")
    return torch.stack([torch.zeros_like(logit), logit], dim=1)


def modality_confusion_losses(
    disc: nn.Module,
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-player update's two losses, each reaching only its own player.

    With ``x`` the ``N = N_i + N_t`` embeddings (images label 0, texts label 1), ``sg`` stop
    gradient and ``p(x) = softmax(D(x))``::

        L_D    = CE(D(sg(x)), smoothed labels)                 -> gradient to D only
        L_conf = 1/N sum_x KL(u || p_sg(D)(x)),  u = (1/2, 1/2) -> gradient to the encoders only
               = 1/N sum_x ( -1/2 log p_0(x) - 1/2 log p_1(x) ) - log 2

    ``L_conf`` is 0 exactly when the (frozen) discriminator says 0.5 for every embedding; its
    gradient w.r.t. a text logit ``l`` of the one-logit head is ``(sigmoid(l) - 1/2) / N``.
    ``label_smoothing`` ``s`` makes the discriminator's targets ``1 - s/2`` and ``s/2``.
    ``disc`` must take ``frozen=True`` (weights detached), as
    :class:`raycmr.models.adversary.ModalityDiscriminator` does. Returns ``(L_D, L_conf,
    accuracy)``; ``accuracy`` (detached) is the fraction of embeddings whose modality the
    discriminator gets right (0.5 = chance).
    """
    feats = torch.cat([img_emb, txt_emb], dim=0)
    n = feats.shape[0]
    target = torch.cat([
        torch.zeros(img_emb.shape[0], dtype=torch.long, device=feats.device),
        torch.ones(txt_emb.shape[0], dtype=torch.long, device=feats.device),
    ])
    d_logits = two_way_logits(disc(feats.detach()), n)
    disc_loss = F.cross_entropy(d_logits, target, label_smoothing=label_smoothing)
    e_logits = two_way_logits(disc(feats, frozen=True), n)
    confusion = -F.log_softmax(e_logits, dim=1).mean(dim=1).mean() - math.log(2.0)
    with torch.no_grad():
        accuracy = (d_logits.argmax(dim=1) == target).float().mean()
    return disc_loss, confusion, accuracy
