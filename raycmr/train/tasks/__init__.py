"""Training tasks: what one model needs from the engine (interface: :mod:`.base`).

``TASKS`` maps a task name to ``"module:Class"``; tasks are imported only when a worker builds
one, so a task's heavy imports stay out of the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from raycmr.config import Config
from raycmr.train.tasks.base import StepInfo, Task

__all__ = ["TASKS", "StepInfo", "Task", "make_task"]

TASKS: dict[str, str] = {
    "dual_encoder": "raycmr.train.tasks.dual_encoder:DualEncoderTask",
    "dckt": "raycmr.train.tasks.dckt:DCKTTask",
    "slow": "raycmr.train.tasks.slow:SlowTask",
}


def make_task(name: str, cfg: Config, params: dict[str, Any] | None = None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown training task '{name}'; known: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, dict(params or {}))
