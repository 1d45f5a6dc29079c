"""The main job: synthetic shards -> 2 DeepSpeed workers on a (local) Ray cluster -> held-out R@K.

    python jobs/quickstart.py [--config NAME] [--verbose] [--minimal-pairs] [--validation]
                              [--json PATH] [dotted overrides...]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/quickstart.py

``--minimal-pairs`` also writes 300 minimal-pair groups (images that differ in one binding,
`raycmr shards synthetic --minimal-pairs`) and prints the fast stage's group accuracy on them;
``--json`` writes the test metrics (and the total time) to PATH. ``--validation`` reads the
validation split and a validation minimal-pair set (seed 1) instead of the test split and the
seed-0 set: settings are chosen with it. ``--config quickstart_hard`` trains on the training
scenes with their rendered hard negative images (written on first use, `data.group_size`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raycmr.config import load_config
from raycmr.data.synthetic import write_minimal_pairs, write_synthetic_split, write_synthetic_splits
from raycmr.evaluate.checkpoint import evaluate_checkpoint
from raycmr.reporting.console import console_session, group_accuracy_line, metrics_table
from raycmr.train.session import LOG_FILE, best_checkpoint, run_paths, train_on_console

SHARDS = Path("out/quickstart/shards")
MINIMAL_PAIRS = {"test": (SHARDS / "minimal_pairs", 0), "val": (SHARDS / "minimal_pairs_val", 1)}
TRAIN_SCENES = 4000


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="quickstart")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--minimal-pairs", action="store_true")
    p.add_argument("--validation", action="store_true")
    p.add_argument("--json")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    verbose, split = args.verbose, "val" if args.validation else "test"
    start = time.time()
    cfg = load_config(args.config, args.overrides)
    name, run_dir = run_paths(cfg)
    with console_session(run_dir / LOG_FILE, verbose) as console:
        if not (SHARDS / "test").exists():
            summary = write_synthetic_splits(SHARDS, n_train=4000, n_val=500, n_test=500, seed=0)
            console.print(f"wrote synthetic shards to {SHARDS}: " + ", ".join(
                f"{split} {s.rows} rows" for split, s in summary.items()))
        if cfg.data.group_size and not Path(cfg.data.train[0]).exists():
            summary = write_synthetic_split(cfg.data.train[0], "train", TRAIN_SCENES, seed=0,
                                            hard_images=True, progress=False)
            console.print(f"wrote {TRAIN_SCENES} training scenes with their hard negative "
                          f"images to {cfg.data.train[0]}: {summary.rows} rows")
        result = train_on_console(cfg, console, name, run_dir, verbose)
        if result.error:
            console.print(f"training failed: {result.error}   (details: {run_dir / LOG_FILE})")
            return 1
        best = best_checkpoint(result)
        metrics = evaluate_checkpoint(best.path, split)
        chance = 1.0 / metrics["num_images"]
        console.print()
        title = "held-out test set" if split == "test" else "validation set"
        console.print(metrics_table(metrics, f"{title}: {int(metrics['num_images'])} "
                                             f"images, {int(metrics['num_captions'])} captions"))
        ratio = metrics["t2i_r1"] / 100.0 / chance
        console.print(f"text->image R@1 = {ratio:.0f} x chance ({100 * chance:.2f}%)")
        metrics["quickstart_time_s"] = time.time() - start  # without the minimal pairs
        if args.minimal_pairs:
            pairs, seed = MINIMAL_PAIRS[split]
            if not pairs.exists():
                write_minimal_pairs(pairs, 300, seed=seed, progress=False)
            group = evaluate_checkpoint(best.path, "test", [f"data.test=[{pairs}]"])
            metrics.update({k: v for k, v in group.items() if k.startswith("group_")})
            console.print(group_accuracy_line(group), markup=False)
        console.print(f"checkpoint: {best.path}")
        metrics["total_time_s"] = time.time() - start
        console.print(f"total time: {metrics['total_time_s']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint": str(best.path), **metrics},
                                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
