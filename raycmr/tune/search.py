"""Search algorithms and trial schedulers for ``raycmr tune``.

- ``tune.search: random`` -> Tune's BasicVariantGenerator (random sampling plus grid entries),
  seeded with ``train.seed``, at most ``tune.max_concurrent`` trials at a time; ``optuna`` ->
  OptunaSearch with a seeded TPE sampler behind a ConcurrencyLimiter of ``tune.max_concurrent``.
- ``tune.scheduler: asha`` -> ASHA on the validation metric (mode max) with ``epoch`` as time,
  ``tune.grace_period`` and ``tune.reduction_factor``; ``fifo`` runs every trial to the end.

Tune does not save scheduler state with the experiment, so a restored ASHA would forget the
rung values of the trials run before the interruption and let every later trial through its
first rungs. :class:`ResumableASHA` rebuilds them from each restored trial's ``result.json``.
"""

from __future__ import annotations

import json
import logging

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from raycmr import compat
from raycmr.config import Config, with_overrides
from raycmr.tune.spaces import ParamSpec, max_value

logger = logging.getLogger(__name__)

TIME_ATTR = "epoch"  # reported by the training loop once per epoch, continues across restores


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA that, when Tune adds a trial restored from an earlier session, replays the trial's
    recorded results into its bracket, so rung cutoffs survive ``raycmr tune --resume``."""

    def on_trial_add(self, tune_controller, trial) -> None:
        """Assign a bracket (as ASHA does), then replay any recorded history of the trial."""
        super().on_trial_add(tune_controller, trial)
        if not trial.run_metadata.last_result:
            return  # a fresh trial
        compat.asha_replay(self, trial, _recorded_results(trial))


def _recorded_results(trial) -> list[dict]:
    """The results a trial reported so far (its ``result.json``, one JSON object a line)."""
    candidates = []
    if trial.local_path:
        candidates.append((None, f"{trial.local_path}/result.json"))
    if trial.path:
        candidates.append((trial.storage.storage_filesystem, f"{trial.path}/result.json"))
    for fs, path in candidates:
        try:
            if fs is None:
                with open(path) as fh:
                    text = fh.read()
            else:
                with fs.open_input_stream(path) as fh:
                    text = fh.readall().decode()
        except (OSError, FileNotFoundError):
            continue
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
        return rows
    logger.warning("no result.json for restored trial %s: ASHA starts it afresh", trial.trial_id)
    return []


BUDGET_KEYS = ("train.epochs", "dckt.rounds", "dckt.epochs_per_round")


def epoch_budget(cfg: Config) -> int:
    """Epochs one training run reports: ``train.epochs``, plus ``dckt.rounds`` x
    ``dckt.epochs_per_round`` for DCKT (its epoch counter runs on across rounds)."""
    extra = cfg.dckt.rounds * cfg.dckt.epochs_per_round if cfg.train.task == "dckt" else 0
    return cfg.train.epochs + extra


def max_epochs(cfg: Config, specs: dict[str, ParamSpec]) -> int:
    """The longest a trial can run, in epochs (the largest searched values of the keys that set
    the budget)."""
    top = {k: max_value(specs[k]) for k in BUDGET_KEYS if k in specs}
    return epoch_budget(with_overrides(cfg, top) if top else cfg)


def build_scheduler(cfg: Config, specs: dict[str, ParamSpec]):
    """ASHA (or FIFO) from ``cfg.tune``; metric and mode come from the TuneConfig."""
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    max_t = max_epochs(cfg, specs)
    return ResumableASHA(
        time_attr=TIME_ATTR, max_t=max_t,
        grace_period=max(1, min(cfg.tune.grace_period, max_t)),
        reduction_factor=cfg.tune.reduction_factor,
    )


def build_search_alg(cfg: Config, specs: dict[str, ParamSpec]):
    """BasicVariantGenerator (random + grid) or OptunaSearch (TPE) behind a ConcurrencyLimiter."""
    if cfg.tune.search == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=cfg.train.seed)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler),
                                  max_concurrent=max(1, cfg.tune.max_concurrent))
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.train.seed,
                                 max_concurrent=max(0, cfg.tune.max_concurrent))
