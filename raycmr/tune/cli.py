"""``raycmr tune``: hyperparameter search over whole distributed training runs.

    raycmr tune --config wikipedia tune.num_samples=16 tune.max_concurrent=2
    raycmr tune --config my.yaml 'tune.space={loss.margin: {loguniform: [0.05, 0.5]}}'
    raycmr tune --resume runs/tune/tune-20250101-120000      # continue an interrupted search
    raycmr tune --report runs/tune/tune-20250101-120000      # rewrite table, plot, best config

The search space is ``tune.space`` in the config (see :mod:`raycmr.tune.spaces`); when empty,
the default space of margins, loss weights and alphas for what the config enables.
"""

from __future__ import annotations

import argparse
import sys

from raycmr.config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``raycmr tune`` flags."""
    p.add_argument("--config", default=None,
                   help="a shipped config name (quickstart, wikipedia, ...) or a YAML path")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the interrupted experiment in PATH (finished trials are kept)")
    p.add_argument("--retry-errored", action="store_true",
                   help="with --resume: also continue errored trials from their last checkpoint")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="write the results of the experiment in PATH again, without running")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. tune.num_samples=8 train.epochs=10")
    from raycmr.reporting.console import add_verbose_flag

    add_verbose_flag(p)


def summarize(exp, out=None) -> dict | None:
    """Write the results table, plot, best config and best.json into the experiment dir and
    print them (to ``out``, default stdout); returns the contents of best.json (None when no
    trial reported the metric)."""
    from raycmr.config import with_overrides
    from raycmr.tune import report
    from raycmr.tune.search import epoch_budget
    from raycmr.tune.spaces import is_log

    out = out or sys.stdout
    params = list(exp.specs)

    def budget(trial_params: dict) -> int:
        try:
            return epoch_budget(with_overrides(exp.cfg, trial_params))
        except ConfigError:
            return epoch_budget(exp.cfg)

    frame = report.trial_frame(exp.results, params, exp.metric, budget)
    paths = report.write_report(frame, exp.path, exp.metric, params,
                                [k for k, s in exp.specs.items() if is_log(s)])
    best = report.write_best(exp.cfg, frame, exp.path, exp.metric, params)
    print(f"\n{len(frame)} trials, ranked by {exp.metric} (best epoch of each):", file=out)
    print(report.format_table(frame, exp.metric, params), file=out)
    print(f"\nexperiment: {exp.path}", file=out)
    print(f"table:      {paths['csv']} (+ {report.RESULTS_PARQUET})", file=out)
    print(f"plot:       {paths['plot']}", file=out)
    if best is None:
        print("no trial reported a validation metric: see the error column", file=out)
        return None
    print(f"best trial: {best['trial_id']}  {exp.metric} {best['value']:.4f} at epoch "
          f"{best['best_epoch']} of {best['epochs']}  {best['params']}", file=out)
    print(f"best config: {best['config']}   (raycmr train --config {best['config']})", file=out)
    print(f"checkpoint:  {best['checkpoint'] or '(none saved)'}", file=out)
    return best


def run(args: argparse.Namespace) -> int:
    """Start, resume or report an experiment; 0 when some trial reported the metric."""
    from raycmr.tune import runner

    chosen = [flag for flag, value in (("--resume", args.resume), ("--report", args.report))
              if value]
    if len(chosen) > 1:
        raise ConfigError("give only one of --resume and --report")
    if chosen and (args.config or args.overrides):
        raise ConfigError(f"{chosen[0]} continues an experiment with the config it started "
                          "from: drop --config and the overrides")
    if args.retry_errored and not args.resume:
        raise ConfigError("--retry-errored goes with --resume PATH")

    if args.report:
        return 0 if summarize(runner.load(args.report)) is not None else 1
    from raycmr.reporting.console import console_session

    if args.resume:
        path = runner.absolute(args.resume).rstrip("/")
        with console_session(_log_path(path), args.verbose) as console:
            console.print(f"[raycmr] resuming {path}; log (Ray, trials): {_log_path(path)}")
            exp = runner.resume(path, retry_errored=args.retry_errored)
            return 0 if summarize(exp, out=console.file) is not None else 1
    from raycmr.train.registry import validation_metric
    from raycmr.tune.live import TrialTable

    cfg = load_config(args.config, args.overrides)
    params = list(runner.check_tune_settings(cfg))  # a bad setting stops before any folder
    path = runner.experiment_path(cfg)
    log = _log_path(path)
    with console_session(log, args.verbose) as console:

        def announce(path: str) -> None:
            console.print(f"[raycmr] tune experiment: {path}\n[raycmr] if interrupted, continue "
                          f"with: raycmr tune --resume {path}")
            if not args.verbose:
                console.print(f"[raycmr] log (Ray, trials): {log}")
            if "://" not in path:
                console.print(f"[raycmr] tensorboard --logdir {path}/{runner.TRAIN_RUNS_DIR}")

        table = TrialTable(console, validation_metric(cfg), params)
        exp = runner.start(cfg, path=path, on_start=announce, callbacks=[table])
        return 0 if summarize(exp, out=console.file) is not None else 1


def _log_path(path: str):
    """The experiment's log file: in its folder when local, else raycmr-logs/NAME/tune.log."""
    from pathlib import Path

    if "://" in path:
        return Path("raycmr-logs", path.rstrip("/").rsplit("/", 1)[-1], "tune.log")
    return Path(path, "tune.log")
