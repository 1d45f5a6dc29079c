"""The slow model's task (Miech et al. 2021): the captioning model
:class:`raycmr.models.slow.SlowModel` trained by ``L_CA = -mean_i h(x_i, y_i)`` over the
positive pairs of each worker's batch (no negatives, so nothing is gathered across workers).

Validation is what the slow model is for: text->image R@1/5/10 of the validation split after
re-ranking the top ``slow.rerank_k`` of the dual encoder at ``slow.fast_checkpoint`` by
``h + slow.beta * fast`` (``val_t2i_r1``; the fast stage's own figures beside it as
``val_fast_*``), or, without a fast checkpoint, slow-only R@K of the first
``slow.val_queries`` captions against every validation image. Every worker computes ``phi(x)``
(and the fast embeddings) of its share of the validation batches; rank 0 scores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raycmr.evaluate import rerank as rr
from raycmr.evaluate.metrics import group_pairs
from raycmr.losses.captioning import captioning_loss
from raycmr.models.slow import SlowModel, build_slow_model
from raycmr.train.task import Batch, ShardMap, StepInfo, Task, state_dict_fp32


class SlowObjective(nn.Module):
    """The module DeepSpeed wraps: the slow model and its captioning loss."""

    def __init__(self, model: SlowModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores = self.model(batch)
        directions = 2 if self.model.backward_decoder is not None else 1
        tokens = (batch["attention_mask"].sum(1) - 1).clamp(min=1).sum() * directions
        return {"loss": captioning_loss(scores),
                "nll_per_token": (-scores.detach().sum() / tokens).detach()}


class SlowTask(Task):
    """``params``: ``vocab``, the tokenizer ids the decoders predict over (computed on the
    driver from the training captions, :func:`raycmr.train.slow.driver.slow_task_params`)."""

    log_name = "raycmr-slow"

    def __init__(self, cfg, params: dict[str, Any]) -> None:
        super().__init__(cfg, params)
        self._fast: nn.Module | None = None

    def build_module(self) -> nn.Module:
        model = build_slow_model(self.cfg.slow, torch.tensor(self.params["vocab"]),
                                 self.cfg.data.image_size, self.cfg.data.max_text_len)
        return SlowObjective(model)

    def forward(self, engine: Any, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        return engine(batch)

    def rows(self, batch: Batch) -> int:
        return int(batch["group"].shape[0])

    def fast_model(self, device: torch.device) -> nn.Module | None:
        """The frozen dual encoder of ``slow.fast_checkpoint`` (loaded once), or None."""
        if not self.cfg.slow.fast_checkpoint:
            return None
        if self._fast is None:
            from raycmr.artifacts import load_exported

            self._fast, _ = load_exported(self.cfg.slow.fast_checkpoint)
        return self._fast.to(device).eval()

    def validate(self, module: nn.Module, shard_map: ShardMap) -> dict[str, float]:
        slow: SlowModel = module.model
        device = next(slow.parameters()).device
        fast = self.fast_model(device)

        def encode(batch: Batch) -> dict[str, torch.Tensor]:
            out = {"phi": slow.encode_image(batch["pixel_values"]).float().cpu(),
                   "ids": batch["input_ids"].cpu(), "mask": batch["attention_mask"].cpu(),
                   "group": batch["group"].cpu()}
            if fast is not None:
                img, txt = fast.retrieval_embed(batch)
                out.update(fimg=img.float().cpu(), ftxt=txt.float().cpu())
            return out

        parts = shard_map(encode)
        if not parts:
            return {}
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        image_rows, target = group_pairs(cat["group"].numpy())
        rows = torch.as_tensor(image_rows)
        phi = cat["phi"][rows].to(device)
        split = rr.RerankSplit(phi, cat["ids"].to(device), cat["mask"].to(device), target,
                               gallery=slow.gallery(phi))
        slow_cfg = self.cfg.slow
        if fast is None:
            ranks = rr.slow_only_ranks(slow, split.head(slow_cfg.val_queries))
            return {f"val_{k}": v for k, v in rr.summary(ranks, "t2i").items()}
        split.fast_img, split.fast_txt = cat["fimg"][rows].to(device), cat["ftxt"].to(device)
        k = min(slow_cfg.rerank_k, len(image_rows))
        metrics = {f"val_{m}": v for m, v in rr.summary(
            rr.rerank_ranks(slow, split, k, slow_cfg.beta), "t2i").items()}
        fast_ranks = rr.fast_ranks(split)
        metrics.update({f"val_fast_{m}": v for m, v in rr.summary(fast_ranks, "t2i").items()})
        metrics["val_fast_recall_at_k"] = rr.recall_at(fast_ranks, k)
        return metrics

    def export(self, module: nn.Module):
        return state_dict_fp32(module.model), {}
