"""Driver side of training: Ray Data datasets + a Ray Train TorchTrainer running the loop."""

from __future__ import annotations

import time
from pathlib import Path

from raycmr.config import Config, ConfigError
from raycmr.data.pipeline import build_dataset, count_rows


def _storage_path(path: str) -> str:
    """Ray Train wants an absolute local path or a URI (s3://, gs://, ...)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_name(cfg: Config) -> str:
    return cfg.train.name or time.strftime("raycmr-%Y%m%d-%H%M%S")


def validation_metric(cfg: Config) -> str:
    return "val_avg_map" if cfg.eval.metric == "map" else "val_rsum"


def build_trainer(cfg: Config, *, name: str | None = None, callbacks: list | None = None,
                  storage_path: str | None = None, inject_failure: dict | None = None):
    """The TorchTrainer that `raycmr train` runs and each Ray Tune trial runs.

    ``inject_failure`` ({"step": N, "marker": PATH}) makes rank 0 fail once at step N: the
    fault-tolerance tests use it to check recovery from the latest checkpoint."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raycmr.train.loop import steps_per_epoch, train_loop_per_worker

    # per-operator bars from every split coordinator drown the training log; metrics carry it
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not cfg.data.train:
        raise ConfigError("data.train is empty: point it at shard files or dirs "
                          "(e.g. data.train=[out/shards/train])")
    train_rows = count_rows(cfg.data.train)
    if steps_per_epoch(cfg, train_rows) == 0:
        raise ConfigError(
            f"{train_rows} training rows give no full batch for {cfg.train.num_workers} workers "
            f"x train.batch_size={cfg.train.batch_size}: lower one of them"
        )
    train_ds = build_dataset(cfg.data.train, cfg.data, training=True, seed=cfg.train.seed)
    if train_rows <= cfg.data.cache_train_rows:
        train_ds = train_ds.materialize()
    datasets = {"train": train_ds}
    if cfg.data.val:
        val = build_dataset(cfg.data.val, cfg.data, training=False)
        if count_rows(cfg.data.val) <= cfg.eval.cache_val_rows:
            val = val.materialize()  # small: decode once, not once per epoch and worker
        datasets["val"] = val
    metric = validation_metric(cfg)
    run_config = RunConfig(
        name=name or run_name(cfg),
        storage_path=_storage_path(storage_path or cfg.train.storage_path),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.num_to_keep if cfg.train.num_to_keep > 0 else None,
            checkpoint_score_attribute=metric if cfg.data.val else None,
            checkpoint_score_order="max",
        ),
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=callbacks,
    )
    worker_resources: dict[str, float] = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        worker_resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "train_rows": train_rows,
                           "inject_failure": inject_failure},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                     use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources),
        run_config=run_config,
        datasets=datasets,
        # Only the training stream is split; every worker sees the whole validation set.
        dataset_config=DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
    )


def train(cfg: Config):
    """Run training to the end; returns Ray Train's Result (metrics, checkpoint, path), or with
    ``dckt.enabled`` the DCKT rounds' :class:`~raycmr.train.dckt.DCKTResult` (same fields)."""
    from raycmr.runtime import init_ray

    if cfg.dckt.enabled:
        from raycmr.train.dckt import run_dckt

        return run_dckt(cfg)
    init_ray(min_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 2)
    return build_trainer(cfg).fit()
