"""Driver side of a dual encoder run (``train.task=dual_encoder``): check the distillation
teacher, then the one trainer with the ``dual_encoder`` task."""

from __future__ import annotations

from raycmr.config import Config
from raycmr.train.trainer import build_trainer, fit_run


def run(cfg: Config, *, name: str | None = None, board=None):
    if cfg.loss.distill.enabled:  # a teacher that cannot teach this model stops here, not on a worker
        from raycmr.train.dual_encoder.objective import load_teacher

        load_teacher(cfg)
    return fit_run(cfg, lambda: build_trainer(cfg, name=name, board=board))
