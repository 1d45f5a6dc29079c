"""Streaming training check: one epoch of `raycmr train` (2 workers, quickstart model) over R
rows for two values of R; peak memory of every process must not grow with R.

    python benchmarks/bench_streaming.py --shards out/million/shards/test [--rows 20000 200000]

Training reads the first ``R / rows_per_shard`` shards of ``--shards`` (e.g. the million-image
set of ``bench_million.py``), validates on the quickstart validation split, and runs as a
subprocess while :mod:`memwatch` samples its process tree: the driver, the Ray Train workers,
the Ray Data tasks that read and decode the shards, and Ray's own processes. Ray Data streams
blocks from the Parquet files through the decode tasks into each worker's iterator, so no
process should hold the epoch: a peak that grows ~10x with the rows is a leak or a collect.
Writes ``benchmarks/results/bench_streaming.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

try:  # `python -m benchmarks.bench_streaming` from the repo root
    from benchmarks.common import print_table, write_result
    from benchmarks.memwatch import run_sampled
except ImportError:  # `python benchmarks/bench_streaming.py`
    from common import print_table, write_result
    from memwatch import run_sampled

NAME = "bench_streaming"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="folder of image shards (part-*.parquet)")
    p.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    p.add_argument("--val", default="out/quickstart/shards/val")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="out/streaming")
    return p.parse_args(argv)


def first_shards(folder: str, rows: int) -> list[str]:
    """The fewest leading shards of ``folder`` holding at least ``rows`` rows."""
    files, total = [], 0
    for path in sorted(Path(folder).glob("part-*.parquet")):
        if total >= rows:
            break
        files.append(str(path))
        total += pq.ParquetFile(path).metadata.num_rows
    if total < rows:
        raise SystemExit(f"{folder} holds {total} rows, fewer than {rows}")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_out = []
    load_start = os.getloadavg()[0]
    for rows in args.rows:
        files = first_shards(args.shards, rows)
        cmd = [sys.executable, "-m", "raycmr.cli", "train", "--config", "quickstart",
               f"data.train=[{','.join(files)}]", f"data.val=[{args.val}]",
               f"train.num_workers={args.workers}", "train.epochs=1",
               f"train.storage_path={(out / 'runs').resolve()}", f"train.name=rows{rows}"]
        print(f"== {rows:,} rows ({len(files)} shards): raycmr train ... train.epochs=1",
              flush=True)
        t0 = time.time()
        peaks = run_sampled(cmd, str(out / f"train_{rows}.log"))
        if peaks.returncode:
            tail = (out / f"train_{rows}.log").read_text().splitlines()[-15:]
            raise SystemExit(f"raycmr train failed (exit {peaks.returncode}):\n" + "\n".join(tail))
        info = peaks.to_dict()
        uss, rss = info["peak_uss_mb"], info["peak_rss_mb"]
        row = {"rows": rows, "shards": len(files), "wall_s": round(time.time() - t0, 1),
               "rows_per_s": round(rows / peaks.wall_s, 1),
               "driver_mb": uss.get("driver", 0.0),
               "train_worker_mb": max((v for k, v in uss.items() if "RayTrainWorker" in k),
                                      default=0.0),
               "data_task_mb": max((v for k, v in uss.items() if k.startswith("ray::")
                                    and "RayTrainWorker" not in k), default=0.0),
               "raylet_mb": uss.get("raylet", 0.0),
               "tree_mb": info["peak_tree_uss_mb"], "tree_rss_mb": info["peak_tree_mb"],
               "spilled_mb": info["peak_spilled_mb"], "peak_uss_mb": uss, "peak_rss_mb": rss}
        rows_out.append(row)
        print(f"   {row['wall_s']} s, {row['rows_per_s']} rows/s; peak own memory (USS): driver "
              f"{row['driver_mb']} MB, train worker {row['train_worker_mb']} MB, Ray Data task "
              f"{row['data_task_mb']} MB, whole tree {row['tree_mb']} MB (RSS "
              f"{row['tree_rss_mb']} MB); spilled {row['spilled_mb']} MB", flush=True)
    first, last = rows_out[0], rows_out[-1]
    growth = {k: round(last[k] / max(first[k], 1e-9), 2)
              for k in ("driver_mb", "train_worker_mb", "data_task_mb", "tree_mb")}
    summary = [f"{last['rows']:,} rows / {first['rows']:,} rows = "
               f"{last['rows'] / first['rows']:.0f}x the data; peak own-memory (USS) ratio: " +
               ", ".join(f"{k.removesuffix('_mb')} {v}x" for k, v in growth.items())]
    columns = ["rows", "shards", "wall_s", "rows_per_s", "driver_mb", "train_worker_mb",
               "data_task_mb", "raylet_mb", "tree_mb", "tree_rss_mb", "spilled_mb"]
    title = (f"one epoch of raycmr train, {args.workers} workers, quickstart model; peak own "
             "memory (USS, MB) of each kind of process (tree_rss_mb: the whole tree's RSS)")
    print_table(rows_out, columns, title=title)
    for line in summary:
        print(line)
    path = write_result(NAME, rows_out, {"args": vars(args), "growth": growth,
                                         "summary": summary, "title": title, "columns": columns,
                                         "loadavg_at_start": round(load_start, 2),
                                         "loadavg_at_end": round(os.getloadavg()[0], 2)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
