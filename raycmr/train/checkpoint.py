"""Checkpoint layout, shared by the trainer, `raycmr eval` and serving.

A checkpoint directory (one per report, written by every worker and merged by Ray Train) holds::

    ds/            DeepSpeed engine state (model, optimizer and scheduler shards of every rank)
    model.pt       the dual encoder's full state dict, loadable without DeepSpeed (rank 0)
    config.yaml    the config the run used (rank 0)
    state.json     epoch, global step, samples seen, metrics at save time (rank 0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from raycmr.config import Config, ConfigError, config_from_dict
from raycmr.models.dual_encoder import DualEncoder

DS_DIR, DS_TAG = "ds", "ds"
MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.pt", "config.yaml", "state.json"


def write_export(directory: str | Path, encoder_state: dict[str, torch.Tensor], cfg: Config,
                 state: dict[str, Any]) -> None:
    directory = Path(directory)
    torch.save(encoder_state, directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(cfg.to_yaml())
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, default=float))


def read_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def find_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint dir, or a run dir (then its newest ``checkpoint_*``)."""
    path = Path(path).expanduser()
    if (path / MODEL_FILE).exists():
        return path
    candidates = sorted(path.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    candidates = [c for c in candidates if (c / MODEL_FILE).exists()]
    if not candidates:
        raise ConfigError(
            f"no raycmr checkpoint at '{path}': give a checkpoint dir holding {MODEL_FILE} "
            "or a run dir holding checkpoint_* dirs"
        )
    return candidates[-1]


def load_exported(path: str | Path) -> tuple[DualEncoder, Config]:
    """The trained dual encoder and its config from a checkpoint, without DeepSpeed."""
    directory = find_checkpoint_dir(path)
    cfg = config_from_dict(yaml.safe_load((directory / CONFIG_FILE).read_text()))
    model = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu"))
    model.eval()
    return model, cfg
