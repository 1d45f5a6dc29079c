"""The contrastive term both the dual encoder and DCKT train: ``loss.kind`` over the global
batch of every worker (one packed gather, anchors by ``loss.anchors``) or over this worker's
batch."""

from __future__ import annotations

import torch

from raycmr import distributed
from raycmr.config import Config, LossConfig
from raycmr.losses.batch import explain_anchors, global_batch, local_batch, resolve_anchors
from raycmr.losses.contrastive import ContrastiveOutput, contrastive_loss
from raycmr.losses.handover import handover_weight, vse_mh_handover_loss


def contrastive(loss_cfg: LossConfig, img: torch.Tensor, txt: torch.Tensor,
                groups: torch.Tensor, logit_scale: torch.Tensor, pad_rows: int,
                progress: float = 1.0,
                hard: tuple[torch.Tensor, torch.Tensor] | None = None) -> ContrastiveOutput:
    """``loss.kind`` over the global batch of every worker (``loss.global_negatives``, one
    packed gather padded to ``pad_rows``, anchors by ``loss.anchors``) or over this worker's
    batch. ``progress`` (optimizer steps done / total) drives MH's warm-up hand-over
    (``loss.mh_warmup``). ``hard``: the perturbed captions' embeddings [rows, k, d] and validity
    [rows, k] (data.hard_negatives); they travel in the same gather as the batch and are extra
    negatives of their own caption's image (NegCLIP)."""
    extra = None if hard is None else hard_negative_rows(*hard)
    if loss_cfg.global_negatives:
        anchors = resolve_anchors(loss_cfg.anchors, distributed.world_size())
        batch = global_batch(img, txt, groups, pad_rows, anchors, extra_txt=extra)
    else:
        batch = local_batch(img, txt, groups, extra)
    if hard is not None:
        from raycmr.losses.hard_negatives import infonce_own_hard_negatives_loss

        return infonce_own_hard_negatives_loss(batch, logit_scale)
    warm = loss_cfg.mh_warmup
    if loss_cfg.kind == "vse_mh" and warm.loss != "none":
        return vse_mh_handover_loss(
            batch, warmup=warm.loss, weight=handover_weight(progress, warm.start, warm.end),
            margin=loss_cfg.margin, logit_scale=logit_scale, tau=warm.tau)
    return contrastive_loss(loss_cfg.kind, batch, margin=loss_cfg.margin, logit_scale=logit_scale)


def hard_negative_rows(neg_txt: torch.Tensor, neg_valid: torch.Tensor) -> torch.Tensor:
    """``neg_txt`` [rows, k, d] with every missing perturbation set to the zero vector, which is
    how it reads as missing after the gather (an embedding is never exactly zero)."""
    return neg_txt * neg_valid.unsqueeze(-1).to(neg_txt.dtype)


def anchors_line(cfg: Config) -> str | None:
    """The run's console line saying which anchors ``loss.anchors`` chose at
    ``train.num_workers`` workers; None when no contrastive loss gathers the batch."""
    loss = cfg.loss
    if cfg.train.task == "slow" or loss.kind == "none" or not loss.global_negatives:
        return None
    return f"loss anchors: {explain_anchors(loss.anchors, cfg.train.num_workers)}"
