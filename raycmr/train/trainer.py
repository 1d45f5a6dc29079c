"""Driver side of training: Ray Data datasets + the one Ray Train TorchTrainer builder.

:func:`build_trainer` serves every task: the dual encoder (``raycmr train``, each Ray Tune
trial) and the slow model train on ``data.train`` built here; DCKT's rounds
(:mod:`raycmr.train.dckt.rounds`) pass their own ``source``/``target`` datasets and task
parameters. :func:`fit_run` runs one trainer to the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raycmr.config import Config, ConfigError
from raycmr.data.pipeline import build_dataset, count_groups, count_rows
from raycmr.train.registry import validation_metric


def absolute_storage_path(path: str) -> str:
    """Ray Train wants an absolute local path or a URI (s3://, gs://, ...); a relative path is
    refused when joining a cluster (:func:`raycmr.runtime.cluster_storage_path`)."""
    from raycmr.runtime import cluster_storage_path

    return cluster_storage_path(path, "train.storage_path")


def run_name(cfg: Config) -> str:
    return cfg.train.name or time.strftime("raycmr-%Y%m%d-%H%M%S")


def local_run_dir(cfg: Config, name: str) -> Path:
    """Where the driver writes a run's log file and TensorBoard events: the run's own folder
    when ``train.storage_path`` is local, else ``raycmr-logs/NAME`` here (object stores take
    no appends)."""
    storage = cfg.train.storage_path
    return Path("raycmr-logs", name) if "://" in storage \
        else Path(absolute_storage_path(storage), name)


def _board_callback(board):
    """Each report of the run, with its checkpoint, to the progress board (the console)."""
    from raycmr.reporting.board import BoardCallback

    return BoardCallback(board)


def validation_dataset(cfg: Config):
    """``data.val`` as a Ray Data dataset (materialised when small), or None."""
    if not cfg.data.val:
        return None
    val = build_dataset(cfg.data.val, cfg.data, training=False)
    if count_rows(cfg.data.val) <= cfg.eval.cache_val_rows:
        val = val.materialize()  # small: decode once, not once per epoch and worker
    return val


def _dual_encoder_run(cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """Datasets and loop settings of a dual encoder run (checked on the driver)."""
    from raycmr.train.loop import steps_per_epoch

    if not cfg.data.train:
        raise ConfigError("data.train is empty: point it at shard files or dirs "
                          "(e.g. data.train=[out/shards/train])")
    size = cfg.data.group_size
    train_rows = count_rows(cfg.data.train)
    units = count_groups(cfg.data.train, size) if size else train_rows  # what a batch counts
    per_epoch = steps_per_epoch(cfg, units)
    if per_epoch == 0:
        raise ConfigError(
            f"{units} training {'groups' if size else 'rows'} give no full batch for "
            f"{cfg.train.num_workers} workers x train.batch_size={cfg.train.batch_size}: "
            "lower one of them"
        )
    train_ds = build_dataset(cfg.data.train, cfg.data, training=True, seed=cfg.train.seed)
    if train_rows <= cfg.data.cache_train_rows:
        train_ds = train_ds.materialize()
    total_steps = per_epoch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    loop = {"steps_per_epoch": per_epoch, "epochs": cfg.train.epochs, "total_steps": total_steps}
    return {"train": train_ds}, loop


def build_trainer(cfg: Config, *, name: str | None = None, callbacks: list | None = None,
                  storage_path: str | None = None, inject_failure: dict | None = None,
                  task: str = "dual_encoder", task_params: dict[str, Any] | None = None,
                  datasets: dict[str, Any] | None = None, loop: dict[str, Any] | None = None,
                  keep_best: bool = True, board=None):
    """The TorchTrainer of one training run of ``task`` (the loop: :mod:`raycmr.train.loop`).

    Without ``datasets``/``loop`` it is a dual encoder run on ``data.train``: what
    `raycmr train` and each Ray Tune trial run. Otherwise ``datasets`` are the task's training
    streams (all split across workers; ``val`` is added from ``data.val``) and ``loop`` its
    ``steps_per_epoch``, ``epochs``, ``total_steps`` (+ optional ``epoch_offset``,
    ``seed_offset``). ``keep_best``: rank checkpoints by the validation metric (else the
    newest are kept). ``inject_failure`` ({"step": N, "marker": PATH}) makes rank 0 fail once
    at step N: the fault-tolerance tests use it to check recovery from the latest checkpoint."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # per-operator bars from every split coordinator drown the training log; metrics carry it
    ray.data.DataContext.get_current().enable_progress_bars = False
    if datasets is None:
        datasets, loop = _dual_encoder_run(cfg)
    split = list(datasets)
    datasets = dict(datasets)
    val = validation_dataset(cfg)
    if val is not None:
        datasets["val"] = val
    metric = validation_metric(cfg)
    run_config = RunConfig(
        name=name or run_name(cfg),
        storage_path=absolute_storage_path(storage_path or cfg.train.storage_path),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.num_to_keep if cfg.train.num_to_keep > 0 else None,
            checkpoint_score_attribute=metric if cfg.data.val and keep_best else None,
            checkpoint_score_order="max",
        ),
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=callbacks if board is None else [*(callbacks or []), _board_callback(board)],
    )
    worker_resources: dict[str, float] = {"CPU": cfg.train.cpus_per_worker,
                                          **cfg.train.worker_resources}
    if cfg.train.use_gpu:
        worker_resources["GPU"] = 1
    from raycmr.train.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "task": task, "task_params": task_params or {},
                           "inject_failure": inject_failure, "board": board, **(loop or {})},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                     use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources),
        run_config=run_config,
        datasets=datasets,
        # The training streams are split; every worker reads the whole validation set and
        # embeds its share of it (raycmr.distributed.sharded_map).
        dataset_config=DataConfig(datasets_to_split=split),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )


def fit_run(cfg: Config, build: Callable[[], Any]):
    """Start (or join) Ray with room for the run, build its trainer (``build()``), fit it, and
    remove the checkpoints a failed worker left unregistered; returns Ray Train's Result."""
    from raycmr.resources import check_cluster_fits, training_demand
    from raycmr.runtime import init_ray
    from raycmr.train.orphans import remove_unregistered_checkpoints

    init_ray(min_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.reserved_cpus)
    check_cluster_fits(training_demand(cfg))
    result = build().fit()
    for path in remove_unregistered_checkpoints(result):
        print(f"[raycmr] removed {path}: a checkpoint a failed worker left unregistered")
    return result
