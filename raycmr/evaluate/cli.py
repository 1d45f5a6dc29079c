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
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="also draw R@K curves, the rank histogram, precision-recall curves "
                        "(labelled data) and a PCA of the embeddings as PNGs into DIR")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.test=[other/test]")
    from raycmr.reporting.console import add_verbose_flag

    add_verbose_flag(p)


def _log_path(checkpoint: str):
    """Where Ray's lines go: ``eval.log`` in the checkpoint's run folder (``raycmr-logs/``
    for a remote checkpoint)."""
    from pathlib import Path

    from raycmr.artifacts import find_checkpoint, is_remote

    checkpoint = find_checkpoint(checkpoint)
    return Path("raycmr-logs", "eval.log") if is_remote(checkpoint) \
        else Path(checkpoint).parent / "eval.log"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr eval``: the metrics table (and plots); Ray's lines go to
    ``eval.log`` in the checkpoint's run folder. With ``--rerank``: the fast / fast+slow /
    slow-only table."""
    if args.rerank:
        return run_rerank(args)
    from raycmr.artifacts import read_config
    from raycmr.config import apply_overrides
    from raycmr.evaluate.checkpoint import evaluate_checkpoint
    from raycmr.reporting.console import console_session, group_accuracy_line, metrics_table

    split = args.split or apply_overrides(read_config(args.checkpoint), args.overrides).eval.split
    with console_session(_log_path(args.checkpoint), args.verbose) as console:
        emb: dict = {}
        metrics = evaluate_checkpoint(args.checkpoint, split, args.overrides,
                                      embeddings_out=emb)
        console.print(metrics_table(metrics, f"{split} split: {int(metrics['num_images'])} "
                                             f"images, {int(metrics['num_captions'])} captions"))
        line = group_accuracy_line(metrics)
        if line:
            console.print(line, markup=False)
        console.print(f"checkpoint: {args.checkpoint}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(metrics, fh, indent=2)
            console.print(f"metrics:    {args.json}")
        if args.plots:
            from raycmr.evaluate.plots import write_plots

            paths = write_plots(emb, args.plots)
            console.print(f"plots:      {args.plots}/ ({', '.join(p.name for p in paths)})")
    return 0


def run_rerank(args: argparse.Namespace) -> int:
    """``raycmr eval --rerank SLOW``: the fast / fast+slow / slow-only table; Ray's lines go to
    ``eval.log`` as for the plain table."""
    from raycmr.evaluate.fast_slow import evaluate_fast_slow, markdown_table
    from raycmr.reporting.console import console_session

    split = args.split or "test"
    with console_session(_log_path(args.checkpoint), args.verbose) as console:
        rows, n_img = evaluate_fast_slow(args.checkpoint, args.rerank, split, args.rerank_k,
                                         args.beta, args.slow_queries, args.overrides)
        console.print(f"{split} text->image, {n_img} images (fast {args.checkpoint}, slow "
                      f"{args.rerank}, beta {args.beta}):", markup=False)
        console.print(markdown_table(rows), markup=False)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
    return 0
