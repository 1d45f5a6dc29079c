"""Data path side by side: the Ray Data pipeline vs a torch DataLoader vs the trainer's appetite.

On the same synthetic shards (the quickstart's 64 px PNG images and captions), one full pass over
the training split per repetition, rows/s of:

* ``ray_data``: what a training worker runs, ``build_dataset`` (read_parquet on the V1 path,
  as shipped, + file shuffle + ``map_batches`` decode/resize/tokenize tasks) and
  ``iter_worker_batches`` (local shuffle buffer, batches of torch tensors, bad rows dropped), on a local Ray instance with ``--workers`` CPUs, so
  at most ``--workers`` preprocessing processes; ``ray_data_v2``: the same with Ray 2.60's
  default V2 Parquet read path (``data.parquet_reader=v2``);
* ``torch_iterable``: ``torch.utils.data.DataLoader`` with ``--workers`` worker processes over an
  ``IterableDataset`` that splits the shard files between workers and runs the *same*
  ``preprocess_images`` on slices of ``--batch`` rows (no shuffling: less work than ray_data);
* ``torch_map``: the usual map-style recipe, rows held in memory, ``shuffle=True``, the same
  ``preprocess_images`` on one row per ``__getitem__``, ``--workers`` worker processes;
* ``train_step``: samples/s that one training process consumes: forward + backward + AdamW step of
  the quickstart model (``CrossModalObjective``) on a real batch of ``--batch`` rows with
  ``--threads`` torch threads, in this process.

The arms run in rotation (``--repeats`` rounds after a warm-up round); figures are medians. A
pass includes its start-up (Ray Data starts a new execution and a DataLoader forks its workers
every epoch), as every training epoch pays it. ``headroom`` = pipeline rows/s / train samples/s:
above 1 the data path outruns one trainer process; ``headroom_per_cpu`` divides each side by the
processes/threads it used (what matters when both share the same cores).

    python benchmarks/bench_ingest.py --small     # 2000 rows, 3 rounds
    python benchmarks/bench_ingest.py             # 8000 rows, 5 rounds
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

try:  # `python -m benchmarks.bench_ingest` from the repo root
    from benchmarks.common import parse_bench_args, print_table, save_run, set_threads
    from benchmarks.raybench import (
        QUICKSTART,
        interleave,
        med,
        spread,
        start_local_ray,
        synthetic_shards,
    )
except ImportError:  # `python benchmarks/bench_ingest.py`
    from common import parse_bench_args, print_table, save_run, set_threads
    from raybench import QUICKSTART, interleave, med, spread, start_local_ray, synthetic_shards

from raycmr.config import DataConfig, load_config
from raycmr.data.pipeline import TENSOR_COLUMNS, build_dataset, iter_worker_batches
from raycmr.data.text import load_text_encoder
from raycmr.data.transforms import preprocess_images
from raycmr.train.dual_encoder.objective import CrossModalObjective

NAME = "bench_ingest"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="2000 rows, 3 rounds, 4 train steps")
    p.add_argument("--rows", type=int, default=8000, help="training rows in the shards")
    p.add_argument("--rows-per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="Ray CPUs (preprocessing processes) = DataLoader num_workers")
    p.add_argument("--batch", type=int, default=64, help="rows per batch (quickstart: 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the train step")
    p.add_argument("--train-steps", type=int, default=8, help="steps per timed train block")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    return parse_bench_args(p, argv, NAME, small={"rows": 2000, "repeats": 3, "train_steps": 4})


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Valid rows of a preprocessed batch as torch tensors (what iter_worker_batches yields)."""
    keep = np.asarray(batch["valid"], dtype=bool)
    return {k: torch.from_numpy(np.ascontiguousarray(v[keep])) for k, v in batch.items()
            if k in TENSOR_COLUMNS}


class ShardStream(torch.utils.data.IterableDataset):
    """Shard files split between DataLoader workers; ``preprocess_images`` on ``chunk`` rows."""

    def __init__(self, files: list[str], cfg: DataConfig, chunk: int, seed: int) -> None:
        self.files, self.cfg, self.chunk, self.seed = files, cfg, chunk, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        encode = load_text_encoder(self.cfg.tokenizer)  # per worker process (cached)
        for file in self.files[wid::nw]:
            for rb in pq.ParquetFile(file).iter_batches(batch_size=self.chunk):
                out = preprocess_images(
                    pa.Table.from_batches([rb]), image_size=self.cfg.image_size,
                    max_text_len=self.cfg.max_text_len, encode=encode, augment=self.cfg.augment,
                    seed=self.seed)
                yield _to_torch(out)


class RowTable(torch.utils.data.Dataset):
    """Map-style: every row in memory, ``preprocess_images`` on one row per item."""

    def __init__(self, table: pa.Table, cfg: DataConfig, seed: int) -> None:
        self.table, self.cfg, self.seed = table, cfg, seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return preprocess_images(
            self.table.slice(i, 1), image_size=self.cfg.image_size,
            max_text_len=self.cfg.max_text_len, encode=load_text_encoder(self.cfg.tokenizer),
            augment=self.cfg.augment, seed=self.seed)


def collate_rows(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    batch = {k: np.concatenate([it[k] for it in items]) for k in items[0]}
    return _to_torch(batch)


def plan_summary(dataset) -> str:
    """``"ListFiles 1 task 1.9 s, ..."`` from the stats of a dataset's last execution."""
    ops = re.findall(r"Operator \d+ (\S+): (\d+) tasks executed, \d+ blocks produced in "
                     r"([\d.]+)(ms|s|min)", dataset.stats())
    scale = {"ms": 1e-3, "s": 1.0, "min": 60.0}
    return ", ".join(f"{op} {n} task{'s' if n != '1' else ''} {float(t) * scale[unit]:.2f} s"
                     for op, n, t, unit in ops)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shards = synthetic_shards(args.rows, 0, rows_per_shard=args.rows_per_shard, seed=args.seed)
    cfg = load_config(QUICKSTART, [f"data.train=[{shards}/train]", "data.val=[]",
                                   "data.test=[]"])
    files = sorted(str(p) for p in Path(shards, "train").glob("*.parquet"))
    start_local_ray(args.workers)
    set_threads(args.threads)  # after ray/pyarrow imports; the train step's threads
    print(f"{args.rows} rows in {len(files)} shards, {args.workers} preprocessing processes, "
          f"batch {args.batch}, train step on {args.threads} torch thread(s), "
          f"{args.repeats} rounds", flush=True)

    ds = build_dataset(cfg.data.train, cfg.data, training=True, seed=args.seed)  # V1 reader
    # the same pipeline on Ray 2.60's default V2 Parquet read path (data.parquet_reader=v2)
    ds_v2 = build_dataset(cfg.data.train, dataclasses.replace(cfg.data, parquet_reader="v2"),
                          training=True, seed=args.seed)
    counts: dict[str, int] = {}
    first: dict[str, list[float]] = collections.defaultdict(list)

    def consume(arm: str, batches) -> None:
        start, n = time.perf_counter(), 0
        for b in batches:
            if n == 0:
                first[arm].append(time.perf_counter() - start)
            n += int(b["group"].shape[0])
        counts[arm] = n

    def ray_batches(dataset):
        return (b for b, _ in iter_worker_batches(
            dataset, args.batch, shuffle_buffer=cfg.data.shuffle_buffer, seed=args.seed,
            drop_last=False))

    stream_loader = torch.utils.data.DataLoader(
        ShardStream(files, cfg.data, args.batch, args.seed), batch_size=None,
        num_workers=args.workers)
    table = pa.concat_tables(pq.read_table(f) for f in files)
    map_loader = torch.utils.data.DataLoader(
        RowTable(table, cfg.data, args.seed), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, collate_fn=collate_rows,
        generator=torch.Generator().manual_seed(args.seed))
    passes = {
        "ray_data": lambda: consume("ray_data", ray_batches(ds)),
        "ray_data_v2": lambda: consume("ray_data_v2", ray_batches(ds_v2)),
        "torch_iterable": lambda: consume("torch_iterable", stream_loader),
        "torch_map": lambda: consume("torch_map", map_loader),
    }

    # one real batch of the pipeline's output feeds the train step
    train_batch = next(iter(stream_loader))
    torch.manual_seed(args.seed)
    model = CrossModalObjective(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)

    def train_block() -> None:
        for _ in range(args.train_steps):
            loss = model(train_batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    times = interleave({**passes, "train_step": train_block}, repeats=args.repeats)
    plans = {"V1": plan_summary(ds), "V2": plan_summary(ds_v2)}
    step_samples = args.train_steps * int(train_batch["group"].shape[0])
    rate = {k: counts[k] / med(v) for k, v in times.items() if k != "train_step"}
    rate["train_step"] = step_samples / med(times["train_step"])
    procs = {arm: args.workers for arm in passes} | {"train_step": args.threads}
    what = {
        "ray_data": "build_dataset + iter_worker_batches (local Ray), as shipped (V1 read)",
        "ray_data_v2": "the same with data.parquet_reader=v2 (Ray 2.60's default)",
        "torch_iterable": "DataLoader, IterableDataset, same preprocess_images",
        "torch_map": "DataLoader, map-style, shuffle, same preprocess_images",
        "train_step": "quickstart model fwd+bwd+AdamW (the consumer)",
    }
    train_per_thread = rate["train_step"] / args.threads
    rows: list[dict[str, Any]] = []
    for arm, ts in times.items():
        n = step_samples if arm == "train_step" else counts[arm]
        per_proc = rate[arm] / procs[arm]
        rows.append({
            "arm": arm, "what": what[arm], "procs": procs[arm], "rows": n,
            "rows_per_s": rate[arm], "spread": spread([n / t for t in ts]),
            "first_batch_s": med(first[arm][1:]) if arm in passes else None,
            "x_ray_data": rate[arm] / rate["ray_data"],
            # CPUs of this pipeline needed to feed one trainer thread
            "cpus_per_trainer": train_per_thread / per_proc if arm in passes else None,
        })
    summary = [
        (f"Ray Data pipeline / torch DataLoader, same decode code, {args.workers} processes: "
        f"{rate['ray_data'] / rate['torch_iterable']:.2f}x (iterable), "
        f"{rate['ray_data'] / rate['torch_map']:.2f}x (map-style)"),
        (f"on Ray 2.60's default V2 read path (data.parquet_reader=v2): "
        f"{rate['ray_data_v2'] / rate['torch_iterable']:.2f}x (iterable); the shipped V1 path is "
        f"{rate['ray_data'] / rate['ray_data_v2']:.2f}x the V2 path"),
        (f"pipeline rows/s / one trainer's samples/s: {rate['ray_data'] / rate['train_step']:.2f} "
        f"(V2 {rate['ray_data_v2'] / rate['train_step']:.2f}, DataLoader "
        f"{rate['torch_iterable'] / rate['train_step']:.2f}); CPUs of preprocessing per trainer "
        f"thread: {rows[0]['cpus_per_trainer']:.2f} (V2 {rows[1]['cpus_per_trainer']:.2f}, "
        f"DataLoader {rows[2]['cpus_per_trainer']:.2f})"),
        ("Ray Data operators of the last pass (tasks, seconds): "
         + "; ".join(f"{k}: {v}" for k, v in plans.items())),
        "verdict: the data path is "
        + ("the bottleneck" if rows[0]["cpus_per_trainer"] > 1 else "not the bottleneck")
        + f" at this size: a trainer thread eats {train_per_thread:.0f} samples/s, one "
        f"pipeline CPU delivers {rate['ray_data'] / args.workers:.0f} rows/s per pass "
        "(start-up included)",
    ]
    columns = ["arm", "what", "procs", "rows", "rows_per_s", "spread", "first_batch_s",
               "x_ray_data", "cpus_per_trainer"]
    formats = {"rows_per_s": ",.1f", "x_ray_data": ".2f", "first_batch_s": ".2f",
               "cpus_per_trainer": ".2f"}
    print()
    text = print_table(rows, columns, formats=formats,
                       title=f"ingest, {args.rows} rows of 64 px PNG + captions, "
                             f"batch {args.batch}, medians of {args.repeats} rounds")
    print("\n" + "\n".join(summary))
    return save_run(args, rows, {
        "title": text.splitlines()[0], "summary": summary, "columns": columns,
        "formats": formats, "ray_data_plans": plans, "ray_over_torch_iterable": rate["ray_data"] / rate["torch_iterable"],
        "ray_over_torch_map": rate["ray_data"] / rate["torch_map"],
        "ray_v2_over_torch_iterable": rate["ray_data_v2"] / rate["torch_iterable"],
        "pipeline_over_train": rate["ray_data"] / rate["train_step"],
        "times_s": times, "first_batch_s": dict(first), "shards": str(shards),
        "files": len(files),
        "timing": "one full pass per round incl. its start-up; arms in rotation after one "
                  "warm-up round; medians",
    })


if __name__ == "__main__":
    sys.exit(main())
