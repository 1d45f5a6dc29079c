"""Running a search: each Ray Tune trial runs the same TorchTrainer as ``raycmr train``.

The pattern is the one Ray documents for Train V2 inside Tune: a function trainable (the trial's
driver, a fraction of a CPU) builds the trainer with ``callbacks=[TuneReportCallback()]`` and
calls ``fit()``; the trainer's workers request their own resources, so trials run side by side
as far as the cluster allows, capped by ``tune.max_concurrent``. Every epoch's validation
metrics reach Tune, where ASHA stops weak trials early.

Experiment layout (``tune.storage_path/tune.name``, a local dir or a URI)::

    raycmr_tune_config.yaml   the resolved config the experiment started from
    tuner.pkl, experiment_state-*.json, ...   Tune's state (what --resume reads)
    <trial_id>/               Tune's per-trial files: params.json, result.json, error.txt
    train_runs/<trial_id>/    the trial's Ray Train run: checkpoint_* dirs

Fault tolerance: a failing trial is recorded as ERROR with its error and the search goes on.
An interrupted experiment continues with :func:`resume`: finished trials are kept as they are,
unfinished ones restart their driver, whose Ray Train run (same name and storage) picks up its
latest checkpoint and continues at the saved epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raycmr import compat
from raycmr.config import Config, ConfigError, config_from_dict, upgrade_saved, with_overrides
from raycmr.tune.spaces import ParamSpec, check_search, param_space, parse_space

BASE_CONFIG_FILE = "raycmr_tune_config.yaml"
TRAIN_RUNS_DIR = "train_runs"
DRIVER_CPUS = 0.25  # the trial's driver only builds the trainer and waits on it


@dataclass
class Experiment:
    """What a finished (or stopped) ``fit`` leaves: the results and how to read them."""

    path: str  # the experiment dir (local path or URI)
    cfg: Config  # the config the experiment started from
    specs: dict[str, ParamSpec]  # the searched keys
    metric: str  # the validation metric trials are ranked by (mode max)
    results: Any  # ray.tune.ResultGrid


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def absolute(path: str) -> str:
    """An absolute local path, or a URI (s3://, gs://, ...) as it is."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def experiment_path(cfg: Config) -> str:
    """``tune.storage_path/tune.name`` as an absolute path or URI (name generated when empty)."""
    from raycmr.runtime import cluster_storage_path

    name = cfg.tune.name or time.strftime("tune-%Y%m%d-%H%M%S")
    return _join(cluster_storage_path(cfg.tune.storage_path, "tune.storage_path"), name)


def _write_text(path: str, text: str) -> None:
    from raycmr.data.paths import split_uri

    fs, inner, _ = split_uri(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as fh:
        fh.write(text.encode())


def _read_text(path: str) -> str:
    from raycmr.data.paths import split_uri

    fs, inner, _ = split_uri(path)
    with fs.open_input_stream(inner) as fh:
        return fh.readall().decode()


def run_trial(config: dict[str, Any], base: dict[str, Any] | None = None,
              runs_dir: str = "") -> None:
    """One trial: the base config with this trial's parameters, trained by the same
    TorchTrainer as ``raycmr train``; its reports reach Tune through TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycmr.train.trainer import build_trainer

    cfg = with_overrides(config_from_dict(base or {}), config)
    trial_id = tune.get_context().get_trial_id()
    # The run name is the trial id: a restarted trial finds its own run and checkpoints again.
    board = None
    if "://" not in runs_dir:  # TensorBoard events of the trial next to its checkpoints
        from raycmr.reporting.board import start_board
        from raycmr.reporting.monitor import RunMonitor
        from raycmr.reporting.tensorboard import TensorBoardSink

        board = start_board()
        monitor = RunMonitor(board, [TensorBoardSink(Path(runs_dir, trial_id, "tensorboard"))])
    from raycmr.tune.placement import RecordPlacementGroup

    trainer = build_trainer(cfg, name=trial_id, storage_path=runs_dir,
                            callbacks=[TuneReportCallback(), RecordPlacementGroup(trial_id)],
                            board=board)
    reported = compat.trial_reports_so_far()
    if board is None:
        result = trainer.fit()
    else:
        with monitor:
            result = trainer.fit()
    if reported is not None and compat.trial_reports_so_far() == reported and result.metrics:
        # Nothing reached Tune in this session: the run had already trained to the end before
        # an interruption cut its last reports off. Report where it ended, so that the trial
        # records its final epoch, metric and checkpoint.
        final = dict(result.metrics)
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
        tune.report(final)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _trainable(cfg: Config, path: str):
    from ray import tune

    fn = tune.with_parameters(run_trial, base=cfg.to_dict(), runs_dir=_join(path, TRAIN_RUNS_DIR))
    return tune.with_resources(fn, {"cpu": DRIVER_CPUS})


def check_tune_settings(cfg: Config) -> dict[str, ParamSpec]:
    """The parsed space, after checking every tune.* setting; ConfigError names the bad one."""
    t = cfg.tune
    if t.num_samples < 1:
        raise ConfigError(f"tune.num_samples must be >= 1, got {t.num_samples}")
    if t.max_concurrent < 1:
        raise ConfigError(f"tune.max_concurrent must be >= 1, got {t.max_concurrent}")
    if t.grace_period < 1:
        raise ConfigError(f"tune.grace_period must be >= 1 epoch, got {t.grace_period}")
    if t.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor must be >= 2, got {t.reduction_factor}")
    if t.time_budget_s < 0:
        raise ConfigError(f"tune.time_budget_s must be >= 0 (0 = no limit), got {t.time_budget_s}")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: point it at shard files or dirs "
                          "(e.g. data.train=[out/shards/train])")
    if not cfg.data.val:
        raise ConfigError("tune ranks trials on validation metrics: set data.val=[PATH]")
    if cfg.train.task != "dual_encoder":
        raise ConfigError(f"raycmr tune searches dual encoder runs, not train.task="
                          f"{cfg.train.task}: tune train.task=dual_encoder and reuse its settings")
    specs = parse_space(cfg)
    check_search(specs, t.search)
    return specs


def check_data(cfg: Config) -> None:
    """The shards exist and have the right columns, checked once here rather than failing the
    same way in every trial; the error names the shard and the fix."""
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError, check_shards

    for split in ("train", "val"):
        try:
            check_shards(getattr(cfg.data, split), cfg.data.kind, cfg.data.format)
        except (ShardReadError, ShardSchemaError) as exc:
            raise ConfigError(f"data.{split}: {exc}") from None


def build_tuner(cfg: Config, path: str, specs: dict[str, ParamSpec], callbacks: list | None = None):
    """The Tuner for a new experiment at ``path``; ``callbacks`` (e.g. the console's live
    table, :class:`raycmr.tune.live.TrialTable`) replace Tune's own progress printing."""
    from ray import tune

    from raycmr.train.registry import validation_metric
    from raycmr.tune.placement import FreeStoppedTrialGroups
    from raycmr.tune.search import build_scheduler, build_search_alg

    storage, name = path.rstrip("/").rsplit("/", 1)
    tune_config = tune.TuneConfig(
        metric=validation_metric(cfg), mode="max",
        search_alg=build_search_alg(cfg, specs),
        scheduler=build_scheduler(cfg, specs),
        num_samples=cfg.tune.num_samples,
        # tune.max_concurrent is enforced by the search algorithm (build_search_alg)
        time_budget_s=cfg.tune.time_budget_s or None,
        trial_name_creator=_trial_dirname,
        trial_dirname_creator=_trial_dirname,
    )
    run_config = tune.RunConfig(
        name=name, storage_path=storage,
        # A failing trial is recorded with its error and the search goes on (Tuner.fit runs
        # with raise_on_failed_trial=False); worker failures inside a trial are retried by Ray
        # Train itself (train.max_failures), from the trial's latest checkpoint.
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        # A stopped trial's worker placement group is removed here too (raycmr.tune.placement)
        callbacks=[*(callbacks or []), FreeStoppedTrialGroups()], verbose=0 if callbacks else None,
    )
    return tune.Tuner(_trainable(cfg, path), param_space=param_space(cfg, specs),
                      tune_config=tune_config, run_config=run_config)


def _init_ray(cfg: Config) -> None:
    from raycmr.runtime import init_ray

    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + DRIVER_CPUS
    init_ray(min_cpus=cfg.tune.max_concurrent * per_trial + 2)


def start(cfg: Config, *, path: str | None = None, on_start=None,
          callbacks: list | None = None) -> Experiment:
    """Run a new search to the end (or the time budget); ``on_start(path)`` is called once the
    experiment dir holds the config, before the first trial starts."""
    from ray import tune

    from raycmr.data.paths import with_absolute_paths
    from raycmr.train.registry import validation_metric

    cfg = with_absolute_paths(cfg)  # each trial runs in its own working directory
    path = path or experiment_path(cfg)
    specs = check_tune_settings(cfg)
    check_data(cfg)
    if tune.Tuner.can_restore(path):
        raise ConfigError(f"'{path}' already holds a Tune experiment: continue it with "
                          f"`raycmr tune --resume {path}` or set another tune.name")
    _write_text(_join(path, BASE_CONFIG_FILE), cfg.to_yaml())
    _init_ray(cfg)
    tuner = build_tuner(cfg, path, specs, callbacks)
    if on_start is not None:
        on_start(path)
    results = tuner.fit()
    return Experiment(path, cfg, specs, validation_metric(cfg), results)


def load_experiment_config(path: str) -> Config:
    """The config an experiment at ``path`` started from."""
    import yaml

    try:
        text = _read_text(_join(path, BASE_CONFIG_FILE))
    except (OSError, FileNotFoundError):
        raise ConfigError(f"'{path}' is not a raycmr tune experiment (no {BASE_CONFIG_FILE}): "
                          "give the experiment dir that `raycmr tune` printed") from None
    return config_from_dict(upgrade_saved(yaml.safe_load(text)))


def resume(path: str, *, retry_errored: bool = False) -> Experiment:
    """Continue an interrupted experiment: finished trials stay as they are, unfinished ones
    continue from their latest Ray Train checkpoint; errored ones too with ``retry_errored``."""
    from ray import tune

    from raycmr.train.registry import validation_metric

    path = absolute(path).rstrip("/")
    cfg = load_experiment_config(path)
    specs = parse_space(cfg)
    if not tune.Tuner.can_restore(path):
        raise ConfigError(f"'{path}' holds no Tune experiment state to resume from "
                          "(it was interrupted before the first trial started): start it again")
    _init_ray(cfg)
    tuner = tune.Tuner.restore(path, trainable=_trainable(cfg, path), resume_unfinished=True,
                               resume_errored=retry_errored, restart_errored=False)
    return Experiment(path, cfg, specs, validation_metric(cfg), tuner.fit())


def load(path: str) -> Experiment:
    """The results of an experiment at ``path`` without running anything."""
    from ray import tune

    from raycmr.train.registry import validation_metric

    path = absolute(path).rstrip("/")
    cfg = load_experiment_config(path)
    tuner = tune.Tuner.restore(path, trainable=_trainable(cfg, path))
    return Experiment(path, cfg, parse_space(cfg), validation_metric(cfg), tuner.get_results())
