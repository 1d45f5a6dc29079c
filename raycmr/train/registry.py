"""The methods ``train.task`` names: each one's worker-side Task and driver-side run.

Entries are ``"module:attribute"`` strings imported on use, so that one method's heavy imports
stay out of the others and the engine never imports a method folder at its top.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raycmr.config import Config

if TYPE_CHECKING:
    from raycmr.train.task import Task


@dataclass(frozen=True)
class Method:
    task: str  # the Task class every worker builds
    driver: str  # run(cfg, *, name, board) -> Result-like (error, metrics, checkpoint, path)
    metric: str = ""  # the validation metric ranking checkpoints ("" = eval.metric's)
    live_progress: bool = True  # rank 0's bars and TensorBoard (DCKT rounds: log lines only)
    test_eval: str = ""  # evaluate(cfg, checkpoint, console) for --eval-test ("" = retrieval)


METHODS: dict[str, Method] = {
    "dual_encoder": Method("raycmr.train.dual_encoder.task:DualEncoderTask",
                           "raycmr.train.dual_encoder.driver:run"),
    "dckt": Method("raycmr.train.dckt.task:DCKTTask", "raycmr.train.dckt.rounds:run_dckt",
                   live_progress=False),
    "slow": Method("raycmr.train.slow.task:SlowTask", "raycmr.train.slow.driver:run",
                   metric="val_t2i_r1", test_eval="raycmr.train.slow.driver:evaluate_test"),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown train.task '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def load(ref: str) -> Any:
    """The attribute a ``"module:attribute"`` entry names."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def make_task(name: str, cfg: Config, params: dict[str, Any] | None = None) -> Task:
    return load(method(name).task)(cfg, dict(params or {}))


def validation_metric(cfg: Config) -> str:
    """The ``val_*`` metric that ranks a run's checkpoints and Tune's trials."""
    return method(cfg.train.task).metric or (
        "val_avg_map" if cfg.eval.metric == "map" else "val_rsum")
