"""The main job: synthetic shards -> 2 DeepSpeed workers on a (local) Ray cluster -> held-out R@K.

    python jobs/quickstart.py [--verbose] [dotted overrides...]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/quickstart.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from raycmr.config import load_config
from raycmr.data.synthetic import write_synthetic_splits
from raycmr.evaluate.checkpoint import evaluate_checkpoint
from raycmr.reporting.console import console_session, metrics_table
from raycmr.train.session import LOG_FILE, best_checkpoint, run_paths, train_on_console

SHARDS = Path("out/quickstart/shards")


def main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    overrides = [a for a in argv if a != "--verbose"]
    start = time.time()
    cfg = load_config("quickstart", overrides)
    name, run_dir = run_paths(cfg)
    with console_session(run_dir / LOG_FILE, verbose) as console:
        if not (SHARDS / "test").exists():
            summary = write_synthetic_splits(SHARDS, n_train=4000, n_val=500, n_test=500, seed=0)
            console.print(f"wrote synthetic shards to {SHARDS}: " + ", ".join(
                f"{split} {s.rows} rows" for split, s in summary.items()))
        result = train_on_console(cfg, console, name, run_dir, verbose)
        if result.error:
            console.print(f"training failed: {result.error}   (details: {run_dir / LOG_FILE})")
            return 1
        best = best_checkpoint(result)
        metrics = evaluate_checkpoint(best.path, "test")
        chance = 1.0 / metrics["num_images"]
        console.print()
        console.print(metrics_table(metrics, f"held-out test set: {int(metrics['num_images'])} "
                                             f"images, {int(metrics['num_captions'])} captions"))
        ratio = metrics["t2i_r1"] / 100.0 / chance
        console.print(f"text->image R@1 = {ratio:.0f} x chance ({100 * chance:.2f}%)")
        console.print(f"checkpoint: {best.path}")
        console.print(f"total time: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
