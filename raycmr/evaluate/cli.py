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
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.test=[other/test]")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr eval``."""
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
