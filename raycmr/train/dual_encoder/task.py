"""The dual encoder task: :class:`~raycmr.train.dual_encoder.objective.CrossModalObjective`
(contrastive over the global batch + GRL adversary + DSCMR + distillation) on the ``train``
stream; validation is retrieval (R@K both ways, mAP when labelled) of the whole validation
set's embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raycmr.train.dual_encoder.objective import CrossModalObjective
from raycmr.train.task import Batch, ShardMap, StepInfo, Task, state_dict_fp32, validate_retrieval


def grl_lambda_now(cfg, step: StepInfo) -> float:
    if not cfg.loss.grl.enabled:
        return 0.0
    from raycmr.losses.adversary import grl_lambda

    g = cfg.loss.grl
    return grl_lambda(g.schedule, progress=step.progress, samples_seen=step.samples_seen,
                      lambda_=g.lambda_, gamma=g.gamma, alpha=g.alpha,
                      ramp_samples=g.ramp_samples)


class DualEncoderTask(Task):
    _cached: Any = None  # GradCache's chunked embeddings, from forward to backward

    def build_module(self) -> nn.Module:
        module = CrossModalObjective(self.cfg)
        if self.cfg.train.embed_chunk:
            from raycmr.train.grad_cache import refuse_batch_statistics

            refuse_batch_statistics(module.encoder)
        return module

    def optimizer_groups(self, module: nn.Module) -> list[Any]:
        """With the adversary, its discriminator in a group of its own at ``train.lr *
        loss.grl.disc_lr_scale`` (the two players' learning rates, Heusel et al. 2017's two
        time-scale rule); otherwise every trainable parameter at ``train.lr``."""
        disc = getattr(module, "discriminator", None)
        if disc is None or self.cfg.loss.grl.disc_lr_scale == 1.0:
            return super().optimizer_groups(module)
        mine = {id(p) for p in disc.parameters()}
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in mine]
        return [{"params": rest},
                {"params": list(disc.parameters()),
                 "lr": self.cfg.train.lr * self.cfg.loss.grl.disc_lr_scale}]

    def forward(self, engine: Any, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        """The objective's forward; with ``train.embed_chunk`` the embeddings come chunk by
        chunk without graph and :meth:`backward` encodes them again (GradCache)."""
        lam = grl_lambda_now(self.cfg, step)
        if self.cfg.train.embed_chunk:
            from raycmr.train.grad_cache import embed_without_graph

            module = engine.module
            self._cached = embed_without_graph(module.encoder, batch, self.rows(batch),
                                               self.cfg.train.embed_chunk, engine.device)
            out = module.losses(*self._cached.leaves, batch, grl_lambda=lam,
                                progress=step.progress)
        else:
            out = engine(batch, grl_lambda=lam, progress=step.progress)
        if self.cfg.loss.grl.enabled:
            out["grl_lambda"] = torch.tensor(lam)
        return out

    def backward(self, engine: Any, out: dict[str, torch.Tensor]) -> None:
        if self._cached is None:
            engine.backward(out["loss"])
            return
        from raycmr.train.grad_cache import backward_through_chunks, engine_backward

        cached, self._cached = self._cached, None
        backward_through_chunks(engine.module.encoder, out["loss"], cached,
                                engine_backward(engine))

    def rows(self, batch: Batch) -> int:
        return int(batch["group"].shape[0])

    def validate(self, module: nn.Module, shard_map: ShardMap) -> dict[str, float]:
        return validate_retrieval(module.encoder, shard_map)

    def export(self, module: nn.Module):
        return state_dict_fp32(module.encoder), {}
