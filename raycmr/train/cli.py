"""`raycmr train`: train the method ``train.task`` names with Ray Train + DeepSpeed.

    raycmr train --config quickstart train.num_workers=2 loss.margin=0.2
    raycmr train --config wikipedia --eval-test
"""

from __future__ import annotations

import argparse

from raycmr.config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr train``."""
    p.add_argument("--config", default=None,
                   help="a shipped config name (quickstart, wikipedia, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_workers=2")
    p.add_argument("--eval-test", action="store_true",
                   help="after training, evaluate the best checkpoint (by the validation metric) "
                        "on data.test: only once the configuration is fixed on validation")
    from raycmr.reporting.console import add_verbose_flag

    add_verbose_flag(p)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr train``: progress on the console, Ray's lines in the run's log."""
    from raycmr.evaluate.checkpoint import evaluate_checkpoint
    from raycmr.reporting.console import console_session, metrics_table
    from raycmr.train.registry import load, method, validation_metric
    from raycmr.train.session import (
        LOG_FILE,
        best_checkpoint,
        print_final,
        run_paths,
        train_on_console,
    )

    cfg = load_config(args.config, args.overrides)
    if args.eval_test and not cfg.data.test:
        raise ConfigError("--eval-test needs data.test shards in the config")
    name, run_dir = run_paths(cfg)
    with console_session(run_dir / LOG_FILE, args.verbose) as console:
        result = train_on_console(cfg, console, name, run_dir, args.verbose)
        if result.error:
            console.print(f"training failed: {result.error}   (details: {run_dir / LOG_FILE})")
            return 1
        print_final(console, result, validation_metric(cfg))
        best = best_checkpoint(result)
        test_eval = method(cfg.train.task).test_eval
        if args.eval_test and best is not None and test_eval:
            load(test_eval)(cfg, best.path, console)
        elif args.eval_test and best is not None:
            metrics = evaluate_checkpoint(best.path, "test")
            console.print()
            console.print(metrics_table(
                metrics, "test metrics of the best checkpoint by validation"))
    return 0
