"""`raycmr eval`: R@K / mAP of a checkpoint on a split.

    raycmr eval --checkpoint runs/NAME/checkpoint_... [--split test] [data.test=[other/test]]
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr eval``."""
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (or run dir: newest one)")
    p.add_argument("--split", default=None, choices=["val", "test"],
                   help="the split to evaluate (default: the checkpoint config's eval.split)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--rerank", default=None, metavar="SLOW",
                   help="a slow-model checkpoint: compare fast, fast+slow (re-rank the fast "
                        "top-K) and slow-only text->image retrieval")
    p.add_argument("--rerank-k", type=int, nargs="+", default=[20], metavar="K",
                   help="re-rank the fast top-K (several: one row each; 0 = every image)")
    p.add_argument("--beta", type=float, default=0.0,
                   help="fast+slow score = h(x, y) + beta * fast dot product")
    p.add_argument("--slow-queries", type=int, default=250,
                   help="slow-only: the first N captions against every image (0 = skip)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.test=[other/test]")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr eval``."""
    if args.rerank:
        return run_rerank(args)
    from raycmr.artifacts import read_config
    from raycmr.config import apply_overrides
    from raycmr.evaluate.checkpoint import evaluate_checkpoint
    from raycmr.evaluate.summary import print_metrics

    split = args.split or apply_overrides(read_config(args.checkpoint), args.overrides).eval.split
    metrics = evaluate_checkpoint(args.checkpoint, split, args.overrides)
    print_metrics(f"{split} metrics ({args.checkpoint}):", metrics)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(metrics, fh, indent=2)
    return 0


def run_rerank(args: argparse.Namespace) -> int:
    """``raycmr eval --rerank SLOW``: the fast / fast+slow / slow-only table."""
    from raycmr.rerank_eval import evaluate_fast_slow, markdown_table

    split = args.split or "test"
    rows, n_img = evaluate_fast_slow(args.checkpoint, args.rerank, split, args.rerank_k,
                                     args.beta, args.slow_queries, args.overrides)
    print(f"{split} text->image, {n_img} images (fast {args.checkpoint}, slow "
          f"{args.rerank}, beta {args.beta}):")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
