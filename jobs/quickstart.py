"""The main job: synthetic shards -> 2 DeepSpeed workers on a (local) Ray cluster -> held-out R@K.

    python jobs/quickstart.py [dotted overrides...]
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/quickstart.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from raycmr.config import load_config
from raycmr.data.synthetic import write_synthetic_splits
from raycmr.evaluate.checkpoint import evaluate_checkpoint
from raycmr.train.run import train

SHARDS = Path("out/quickstart/shards")


def main(overrides: list[str]) -> int:
    start = time.time()
    if not (SHARDS / "test").exists():
        summary = write_synthetic_splits(SHARDS, n_train=4000, n_val=500, n_test=500, seed=0)
        print(f"wrote synthetic shards to {SHARDS}: {summary}")
    cfg = load_config("quickstart", overrides)
    result = train(cfg)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    best = result.best_checkpoints[-1][0] if result.best_checkpoints else result.checkpoint
    metrics = evaluate_checkpoint(best.path, "test")
    chance = 1.0 / metrics["num_images"]
    print("\nheld-out test set: "
          f"{int(metrics['num_images'])} images, {int(metrics['num_captions'])} captions")
    for d in ("i2t", "t2i"):
        print(f"  {d}: R@1 {metrics[f'{d}_r1']:.1f}  R@5 {metrics[f'{d}_r5']:.1f}  "
              f"R@10 {metrics[f'{d}_r10']:.1f}  medr {metrics[f'{d}_medr']:.0f}  "
              f"meanr {metrics[f'{d}_meanr']:.1f}")
    ratio = metrics["t2i_r1"] / 100.0 / chance
    print(f"  text->image R@1 = {ratio:.0f} x chance ({100 * chance:.2f}%)")
    print(f"checkpoint: {best.path}")
    print(f"total time: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
