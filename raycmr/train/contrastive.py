"""The contrastive term both the dual encoder and DCKT train: ``loss.kind`` over the global
batch of every worker (one packed gather) or over this worker's batch."""

from __future__ import annotations

import torch

from raycmr import distributed
from raycmr.config import LossConfig
from raycmr.losses.contrastive import ContrastiveOutput, contrastive_loss
from raycmr.losses.handover import handover_weight, vse_mh_handover_loss


def contrastive(loss_cfg: LossConfig, img: torch.Tensor, txt: torch.Tensor,
                groups: torch.Tensor, logit_scale: torch.Tensor, pad_rows: int,
                progress: float = 1.0,
                hard: tuple[torch.Tensor, torch.Tensor] | None = None) -> ContrastiveOutput:
    """``loss.kind`` over the global batch of every worker (``loss.global_negatives``, one
    packed gather padded to ``pad_rows``) or over this worker's batch. ``progress`` (optimizer
    steps done / total) drives MH's warm-up hand-over (``loss.mh_warmup``). ``hard``: the
    perturbed captions' embeddings [rows, k, d] and validity [rows, k] (data.hard_negatives),
    gathered like the batch, extra negatives of their caption's image (NegCLIP)."""
    gather = loss_cfg.global_negatives and distributed.world_size() > 1
    if gather:
        batch = distributed.gather_global_batch(img, txt, groups, pad_rows)
    else:
        batch = distributed.local_batch(img, txt, groups)
    if hard is not None:
        from raycmr.losses.hard_negatives import (
            gather_hard_negatives,
            infonce_hard_negatives_loss,
        )

        neg, valid = gather_hard_negatives(*hard, pad_rows, batch.sizes) if gather else hard
        return infonce_hard_negatives_loss(batch, neg, valid, logit_scale)
    warm = loss_cfg.mh_warmup
    if loss_cfg.kind == "vse_mh" and warm.loss != "none":
        return vse_mh_handover_loss(
            batch, warmup=warm.loss, weight=handover_weight(progress, warm.start, warm.end),
            margin=loss_cfg.margin, logit_scale=logit_scale, tau=warm.tau)
    return contrastive_loss(loss_cfg.kind, batch, margin=loss_cfg.margin, logit_scale=logit_scale)
