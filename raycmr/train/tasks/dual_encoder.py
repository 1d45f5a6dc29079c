"""The dual encoder task: :class:`~raycmr.train.objective.CrossModalObjective` (contrastive over
the global batch + GRL adversary + DSCMR + distillation) on the ``train`` stream; validation is
retrieval (R@K both ways, mAP when labelled) of the whole validation set's embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raycmr.evaluate.summary import evaluate_embeddings
from raycmr.train.objective import CrossModalObjective
from raycmr.train.tasks.base import Batch, ShardMap, StepInfo, Task, state_dict_fp32


def grl_lambda_now(cfg, step: StepInfo) -> float:
    if not cfg.loss.grl.enabled:
        return 0.0
    from raycmr.losses.adversary import grl_lambda

    g = cfg.loss.grl
    return grl_lambda(g.schedule, progress=step.progress, samples_seen=step.samples_seen,
                      lambda_=g.lambda_, gamma=g.gamma, alpha=g.alpha,
                      ramp_samples=g.ramp_samples)


def validate_retrieval(encoder: nn.Module, shard_map: ShardMap) -> dict[str, float]:
    """``val_*``: R@K both ways (and mAP when labels exist) of ``encoder.retrieval_embed`` over
    the whole validation set, each worker embedding its share (rank 0 returns the metrics)."""
    def embed(batch: Batch) -> dict[str, torch.Tensor]:
        img, txt = encoder.retrieval_embed(batch)
        return {"img": img.float().cpu(), "txt": txt.float().cpu(),
                "group": batch["group"].cpu(), "label": batch["label"].cpu()}

    parts = shard_map(embed)
    if not parts:
        return {}
    emb = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
    if emb["img"].shape[0] == 0:
        return {}
    return {f"val_{k}": v for k, v in evaluate_embeddings(emb).items()}


class DualEncoderTask(Task):
    def build_module(self) -> nn.Module:
        return CrossModalObjective(self.cfg)

    def forward(self, engine: Any, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        lam = grl_lambda_now(self.cfg, step)
        out = engine(batch, grl_lambda=lam, progress=step.progress)
        if self.cfg.loss.grl.enabled:
            out["grl_lambda"] = torch.tensor(lam)
        return out

    def rows(self, batch: Batch) -> int:
        return int(batch["group"].shape[0])

    def validate(self, module: nn.Module, shard_map: ShardMap) -> dict[str, float]:
        return validate_retrieval(module.encoder, shard_map)

    def export(self, module: nn.Module):
        return state_dict_fp32(module.encoder), {}
