"""The main job: synthetic shards -> 2 DeepSpeed workers on a (local) Ray cluster -> held-out R@K.

    python jobs/quickstart.py [--verbose] [--minimal-pairs] [--json PATH] [dotted overrides...]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/quickstart.py

``--minimal-pairs`` also writes 300 minimal-pair groups (images that differ in one binding,
`raycmr shards synthetic --minimal-pairs`) and prints the fast stage's group accuracy on them;
``--json`` writes the test metrics (and the total time) to PATH.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from raycmr.config import load_config
from raycmr.data.synthetic import write_minimal_pairs, write_synthetic_splits
from raycmr.evaluate.checkpoint import evaluate_checkpoint
from raycmr.reporting.console import console_session, group_accuracy_line, metrics_table
from raycmr.train.session import LOG_FILE, best_checkpoint, run_paths, train_on_console

SHARDS = Path("out/quickstart/shards")
MINIMAL_PAIRS = SHARDS / "minimal_pairs"
FLAGS = ("--verbose", "--minimal-pairs")


def main(argv: list[str]) -> int:
    verbose, pairs = "--verbose" in argv, "--minimal-pairs" in argv
    json_path = argv[argv.index("--json") + 1] if "--json" in argv else None
    overrides = [a for i, a in enumerate(argv)
                 if a not in FLAGS and a != "--json" and (i == 0 or argv[i - 1] != "--json")]
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
        metrics["quickstart_time_s"] = time.time() - start  # without the minimal pairs
        if pairs:
            if not MINIMAL_PAIRS.exists():
                write_minimal_pairs(MINIMAL_PAIRS, 300, seed=0, progress=False)
            group = evaluate_checkpoint(best.path, "test", [f"data.test=[{MINIMAL_PAIRS}]"])
            metrics.update({k: v for k, v in group.items() if k.startswith("group_")})
            console.print(group_accuracy_line(group), markup=False)
        console.print(f"checkpoint: {best.path}")
        metrics["total_time_s"] = time.time() - start
        console.print(f"total time: {metrics['total_time_s']:.0f} s")
        if json_path:
            Path(json_path).write_text(json.dumps({"checkpoint": str(best.path), **metrics},
                                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
