"""Helpers shared by the side-by-side benchmarks that run raycmr itself (ingest, training).

* :func:`synthetic_shards`: the quickstart's synthetic image-caption shards, cached under
  ``out/bench/`` (git-ignored) so that reruns skip the generation;
* :func:`start_local_ray`: a fresh local Ray instance (never an existing cluster of someone else);
* :func:`interleave`: A/B/C... timings taken in rotation (A B C, B C A, C A B, ...), so that a
  neighbour's load on a shared machine hits every arm alike; each timing goes through
  ``common.median_of`` and each arm's figure is the median of its repetitions;
* :func:`fit_with_epoch_metrics`: ``build_trainer(cfg).fit()`` plus every epoch's rank-0 metrics
  (Ray Train V2 keeps only checkpointed reports in ``Result.metrics_dataframe``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Nothing is downloaded; `uv run` detection would make Ray wrap every worker in `uv run`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

try:
    from benchmarks.common import REPO_ROOT, median_of
except ImportError:
    from common import REPO_ROOT, median_of

BENCH_DIR = REPO_ROOT / "out" / "bench"

# The quickstart's data settings (raycmr/configs/quickstart.yaml): 64 px images, 24 tokens.
QUICKSTART = "quickstart"


def synthetic_shards(n_train: int, n_val: int = 0, *, image_size: int = 64,
                     rows_per_shard: int = 500, seed: int = 0) -> Path:
    """``<dir>/{train,val,test}/part-*.parquet`` of the synthetic generator, cached by settings."""
    root = BENCH_DIR / f"shards-{n_train}-{n_val}-{image_size}px-{rows_per_shard}-s{seed}"
    if (root / ".complete").exists():
        return root
    from raycmr.data.synthetic import write_synthetic_splits

    print(f"writing synthetic shards to {root} ({n_train} train, {n_val} val rows)", flush=True)
    write_synthetic_splits(root, n_train, n_val, 0, seed=seed, image_size=image_size,
                           rows_per_shard=rows_per_shard, overwrite=True, progress=False)
    (root / ".complete").write_text("ok\n")
    return root


def start_local_ray(num_cpus: int) -> None:
    """A new local Ray instance with ``num_cpus`` logical CPUs, quiet progress bars."""
    import ray
    from ray.data import DataContext

    for attempt in range(3):  # on a saturated machine the node can time out while starting
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        except Exception as exc:  # Ray raises a bare Exception on a start-up timeout
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray.init failed ({exc}); retrying", flush=True)
            time.sleep(10)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def interleave(arms: dict[str, Callable[[], Any]], repeats: int,
               warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each arm, ``repeats`` per arm, the arms taken in rotation.

    ``warmup`` untimed rounds first (every arm once per round). Round ``r`` starts at arm
    ``r mod len(arms)`` so that no arm always runs first (after a pause) or last.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(median_of(arms[name], repeats=1, warmup=0))
    return times


def med(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min..max`` of a list of numbers, for the tables (how noisy the repetitions were)."""
    return f"{min(values):.3g}..{max(values):.3g}" if values else "-"


def make_epoch_callback(path: Path):
    """A Ray Train ``UserCallback`` appending rank 0's metrics of every report to ``path``
    (JSON lines). It runs in the Train controller process, on this machine."""
    import ray.cloudpickle
    from ray.train import UserCallback

    # the controller cannot import this file: ship the class by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class EpochMetrics(UserCallback):
        def __init__(self, out: str) -> None:
            self.out = out

        def after_report(self, run_context, metrics, checkpoint) -> None:
            row = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))}
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    return EpochMetrics(str(path))


def fit_with_epoch_metrics(cfg) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``build_trainer(cfg).fit()`` in a scratch storage dir (deleted afterwards); returns
    the Result and the rank-0 metrics of every epoch in order. Raises if the run failed."""
    from raycmr.train.trainer import build_trainer

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=BENCH_DIR))
    log = scratch / "epochs.jsonl"
    try:
        trainer = build_trainer(cfg, name="bench", storage_path=str(scratch),
                                callbacks=[make_epoch_callback(log)])
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}")
        epochs = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        return result, epochs
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def tiny_run_overrides(shards: Path, *, workers: int, batch: int, epochs: int,
                       threads: int) -> list[str]:
    """Quickstart model and data settings on the cached shards, no checkpoint until the end."""
    return [
        f"data.train=[{shards}/train]", f"data.val=[{shards}/val]", "data.test=[]",
        f"train.num_workers={workers}", f"train.batch_size={batch}", f"train.epochs={epochs}",
        f"train.torch_threads={threads}", "train.checkpoint_every_epochs=1000",
        "train.num_to_keep=1", "train.max_failures=0", f"train.log_every={10**6}",
    ]
