"""`raycmr train`: train a dual encoder (or DCKT rounds) with Ray Train + DeepSpeed.

    raycmr train --config quickstart train.num_workers=2 loss.margin=0.2
    raycmr train --config wikipedia --eval-test
"""

from __future__ import annotations

import argparse
import sys

from raycmr.config import ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr train``."""
    p.add_argument("--config", default=None,
                   help="a shipped config name (quickstart, wikipedia, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_workers=2")
    p.add_argument("--eval-test", action="store_true",
                   help="after training, evaluate the best checkpoint (by the validation metric) "
                        "on data.test: only once the configuration is fixed on validation")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr train``."""
    from raycmr.evaluate.checkpoint import evaluate_checkpoint
    from raycmr.evaluate.summary import print_metrics
    from raycmr.train.run import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print_metrics("final metrics:", {k: v for k, v in result.metrics.items()
                                     if isinstance(v, (int, float, str))})
    best = result.best_checkpoints[-1][0] if result.best_checkpoints else result.checkpoint
    print(f"run dir:    {result.path}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if best is not None:
        print(f"best:       {best.path}")
    if args.eval_test and best is not None:
        if not cfg.data.test:
            raise ConfigError("--eval-test needs data.test shards in the config")
        if cfg.train.task == "slow":
            from raycmr.rerank_eval import evaluate_fast_slow, markdown_table

            rows, n_img = evaluate_fast_slow(cfg.slow.fast_checkpoint or None, best.path, "test",
                                             [cfg.slow.rerank_k], cfg.slow.beta,
                                             cfg.slow.val_queries)
            print(f"test text->image of the best checkpoint by validation, {n_img} images:")
            print(markdown_table(rows))
            return 0
        metrics = evaluate_checkpoint(best.path, "test")
        print_metrics(f"test metrics of the best checkpoint by validation ({best.path}):",
                      metrics)
    return 0
