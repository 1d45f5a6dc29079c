"""Driver side of a slow-model run (``train.task=slow``): the output vocabulary from the
training captions, checks, then the one trainer (:func:`raycmr.train.trainer.build_trainer`)
with the ``slow`` task; ``--eval-test``'s fast+slow evaluation."""

from __future__ import annotations

from typing import Any

import torch

from raycmr.config import Config, ConfigError

VOCAB_ROWS = 200_000  # captions read for the vocabulary (the first ones, in file order)


def slow_task_params(cfg: Config) -> dict[str, Any]:
    """``{"vocab": [...]}``: the tokenizer ids of the training captions (the most frequent
    ``slow.max_vocab`` when capped)."""
    from raycmr.data.captions import caption_tokens
    from raycmr.models.slow import caption_vocab

    ids, mask = caption_tokens(cfg.data.train, cfg.data, max_rows=VOCAB_ROWS)
    if len(ids) == 0:
        raise ConfigError(f"data.train {cfg.data.train} holds no captions to build the slow "
                          "model's vocabulary from")
    vocab = caption_vocab(torch.from_numpy(ids), torch.from_numpy(mask), cfg.slow.max_vocab)
    return {"vocab": [int(v) for v in vocab]}


def check_slow_config(cfg: Config) -> None:
    if cfg.data.kind != "images":
        raise ConfigError("train.task=slow reads pixels and caption tokens: it needs "
                          "data.kind=images")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: point it at image shards "
                          "(e.g. data.train=[out/quickstart/shards/train])")
    if cfg.slow.fast_checkpoint:
        from raycmr.artifacts import read_config

        fast_cfg = read_config(cfg.slow.fast_checkpoint)
        if fast_cfg.train.task == "slow":  # a dual encoder's (or DCKT's target model)
            raise ConfigError(f"slow.fast_checkpoint '{cfg.slow.fast_checkpoint}' is not a "
                              "dual encoder checkpoint")


def resolve_fast_checkpoint(cfg: Config) -> Config:
    """``slow.fast_checkpoint`` as the workers can open it: a run dir becomes its newest
    checkpoint, a relative local path an absolute one (workers run in their own directory)."""
    if not cfg.slow.fast_checkpoint:
        return cfg
    from pathlib import Path

    from raycmr.artifacts import find_checkpoint, is_remote
    from raycmr.config import with_overrides

    path = find_checkpoint(cfg.slow.fast_checkpoint)
    if not is_remote(path):
        path = str(Path(path).resolve())
    return with_overrides(cfg, {"slow.fast_checkpoint": path})


def build_slow_trainer(cfg: Config, **kwargs):
    """The TorchTrainer of a slow-model run (``kwargs``: as for ``build_trainer``)."""
    from raycmr.train.trainer import build_trainer

    check_slow_config(cfg)
    cfg = resolve_fast_checkpoint(cfg)
    return build_trainer(cfg, task="slow", task_params=slow_task_params(cfg), **kwargs)


def run(cfg: Config, *, name: str | None = None, board=None):
    from raycmr.train.trainer import fit_run

    return fit_run(cfg, lambda: build_slow_trainer(cfg, name=name, board=board))


def evaluate_test(cfg: Config, checkpoint: str, console) -> None:
    """``raycmr train --eval-test``: text->image R@K on ``data.test`` after re-ranking the fast
    checkpoint's top ``slow.rerank_k`` with the slow model at ``checkpoint``."""
    from raycmr.evaluate.fast_slow import evaluate_fast_slow, markdown_table

    rows, n_img = evaluate_fast_slow(cfg.slow.fast_checkpoint or None, checkpoint, "test",
                                     [cfg.slow.rerank_k], cfg.slow.beta, cfg.slow.val_queries)
    console.print(f"\ntest text->image of the best checkpoint by validation, {n_img} images:")
    console.print(markdown_table(rows))
