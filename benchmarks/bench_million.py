"""A million-image gallery end to end: shards, index, search, with rows/s, memory and disk.

Synthetic shards, `raycmr index` (Ray Data batch inference + FAISS), then `bench_index` on the
real embeddings, with rows/s, peak memory and disk per stage.

    python benchmarks/bench_million.py --checkpoint runs/quickstart/checkpoint_... \\
        [--images 1000000] [--out out/million] [--workers 2] [--sizes 100000 0]

Stages, each a user-facing command run as a subprocess while :mod:`memwatch` samples its process
tree (the command, the local Ray cluster it starts, every ``ray::`` worker):

1. ``raycmr shards synthetic --test N --workers W``: N images as Parquet shards;
2. ``raycmr index --checkpoint CKPT --split OUT/shards/test --kind flat``: every image through
   the checkpoint's image tower on Ray Data actors, an exact FAISS index;
3. query vectors: the text tower's embeddings of the captions of the last shard (images that
   are in the gallery), by Ray Data batch inference; the gallery's vectors are read back from
   the exact index;
4. ``benchmarks/bench_index.py --embeddings gallery.npy --query-embeddings queries.npy``: flat
   vs IVF vs IVF-PQ vs HNSW at each ``--sizes`` (the gallery's first n rows; 0 = all).

Run it for two sizes (e.g. ``--images 100000`` and ``--images 1000000``) to see whether a
stage's peak memory grows with the gallery. Each run writes OUT/million_N.json; then

    python benchmarks/bench_million.py --render OUT1/million_100000.json OUT2/million_1000000.json

writes ``benchmarks/results/bench_million.json``, which ``benchmarks/run_all.py`` renders into
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:  # `python -m benchmarks.bench_million` from the repo root
    from benchmarks.common import RESULTS_DIR, write_result
    from benchmarks.memwatch import run_sampled
except ImportError:  # `python benchmarks/bench_million.py`
    from common import RESULTS_DIR, write_result
    from memwatch import run_sampled

NAME = "bench_million"
STAGE_COLUMNS = ["stage", "rows", "wall_s", "rows_per_s", "peak_driver_uss_mb",
                 "peak_worker_uss_mb", "peak_tree_uss_mb", "peak_driver_mb", "peak_worker_mb",
                 "peak_tree_mb", "peak_spilled_mb", "load_start", "load_end"]
INDEX_COLUMNS = ["N", "method", "params", "build_s", "search_s", "qps", "recall@10",
                 "score_recall@10", "x_flat"]

HERE = Path(__file__).resolve().parent
RAYCMR = [sys.executable, "-m", "raycmr.cli"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="", help="a quickstart (image) checkpoint")
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--out", default="out/million")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes writing shards")
    p.add_argument("--rows-per-shard", type=int, default=5000)
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data embedding actors")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 0],
                   help="bench_index gallery sizes (first n rows; 0 = all)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--skip", nargs="+", default=[], choices=["shards", "index", "bench"],
                   help="stages whose output from an earlier run is reused")
    p.add_argument("--auto-recall", type=float, default=0.0,
                   help="also run `raycmr index --kind auto --target-recall R` into OUT/index_auto "
                   "and record its choice (0 = skip)")
    p.add_argument("--bench-args", default="",
                   help="extra arguments for bench_index.py (one string)")
    p.add_argument("--render", nargs="+", metavar="MILLION_JSON", default=[],
                   help="run nothing: write benchmarks/results/bench_million.json from these "
                   "OUT/million_N.json files (e.g. a 100k and a 1M run, for BENCHMARKS.md)")
    args = p.parse_args(argv)
    if not args.render and not args.checkpoint:
        p.error("--checkpoint is required (unless --render)")
    return args


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def stage(name: str, cmd: list[str], out: Path, rows: int) -> dict:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    load = os.getloadavg()
    peaks = run_sampled(cmd, str(out / f"{name}.log"))
    record = {"stage": name, "rows": rows, "rows_per_s": round(rows / max(peaks.wall_s, 1e-9), 1),
              "load_start": round(load[0], 2), "load_end": round(os.getloadavg()[0], 2),
              **peaks.to_dict()}
    print(f"   {peaks.wall_s:.0f} s, {record['rows_per_s']:,} rows/s; peak own memory (USS) "
          f"driver {record['peak_driver_uss_mb']:,} MB, largest Ray worker "
          f"{record['peak_worker_uss_mb']:,} MB, whole tree {record['peak_tree_uss_mb']:,} MB; "
          f"peak RSS driver {record['peak_driver_mb']:,} MB, largest Ray worker "
          f"{record['peak_worker_mb']:,} MB, whole tree {record['peak_tree_mb']:,} MB; spilled "
          f"{record['peak_spilled_mb']} MB; exit {peaks.returncode}", flush=True)
    if peaks.returncode:
        tail = (out / f"{name}.log").read_text().splitlines()[-20:]
        raise SystemExit(f"{name} failed (exit {peaks.returncode}); last lines of "
                         f"{out / (name + '.log')}:\n" + "\n".join(tail))
    return record


def export_vectors(out: Path, queries: int, batch_size: int) -> dict:
    """gallery.npy (read back from the exact index) and queries.npy (text embeddings of the
    last shard's captions)."""
    import faiss
    import numpy as np

    from raycmr import artifacts
    from raycmr.evaluate.embedding import embed_split
    from raycmr.runtime import init_ray

    t0 = time.perf_counter()
    index = faiss.read_index(str(out / "index" / "index.faiss"))
    gallery = index.reconstruct_n(0, index.ntotal)
    np.save(out / "gallery.npy", gallery)
    gallery_json = json.loads((out / "index" / "gallery.json").read_text())
    model, cfg = artifacts.load_exported(gallery_json["checkpoint"])
    last = max((out / "shards" / "test").glob("part-*.parquet"))
    init_ray(min_cpus=3)
    emb = embed_split([str(last)], cfg, model.state_dict(), num_actors=2, batch_size=batch_size)
    txt = emb["txt"][:queries]
    np.save(out / "queries.npy", txt)
    return {"gallery_vectors": list(gallery.shape), "query_vectors": list(txt.shape),
            "query_source": str(last), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        write_benchmarks_result([json.loads(Path(f).read_text()) for f in args.render])
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.images
    records = []
    if "shards" not in args.skip:
        records.append(stage("shards", RAYCMR + [
            "shards", "synthetic", "--out", str(out / "shards"), "--train", "0", "--val", "0",
            "--test", str(n), "--workers", str(args.workers),
            "--rows-per-shard", str(args.rows_per_shard), "--overwrite"], out, n))
    if "index" not in args.skip:
        if (out / "index").exists():
            shutil.rmtree(out / "index")
        records.append(stage("index", RAYCMR + [
            "index", "--checkpoint", args.checkpoint, "--split", str(out / "shards" / "test"),
            "--out", str(out / "index"), "--kind", "flat", "--num-actors", str(args.num_actors),
            "--batch-size", str(args.batch_size)], out, n))
    auto = None
    if args.auto_recall > 0:
        if (out / "index_auto").exists():
            shutil.rmtree(out / "index_auto")
        records.append(stage("index_auto", RAYCMR + [
            "index", "--checkpoint", args.checkpoint, "--split", str(out / "shards" / "test"),
            "--out", str(out / "index_auto"), "--kind", "auto", "--target-recall",
            str(args.auto_recall), "--num-actors", str(args.num_actors),
            "--batch-size", str(args.batch_size)], out, n))
        auto = json.loads((out / "index_auto" / "meta.json").read_text())["auto"]
        print(f"   --kind auto chose {auto['kind']} {auto['params']}: recall@10 "
              f"{auto['recall']:.3f} at {auto['speedup']:.1f}x exact search", flush=True)
    disk = {"shards_mb": round(du(out / "shards") / 2**20, 1),
            "index_mb": round(du(out / "index") / 2**20, 1)}
    print(f"disk: shards {disk['shards_mb']:,} MB, index {disk['index_mb']:,} MB", flush=True)
    vectors = None
    if "bench" not in args.skip:
        print("== vectors: gallery from the index, queries from the last shard's captions",
              flush=True)
        vectors = export_vectors(out, args.queries, args.batch_size)
        print(f"   {vectors}", flush=True)
        bench = [sys.executable, str(HERE / "bench_index.py"), "--sizes", "0",
                 "--embeddings", str(out / "gallery.npy"),
                 "--query-embeddings", str(out / "queries.npy"),
                 "--embedding-sizes", *map(str, args.sizes),
                 "--out", f"bench_index_million_{n}", *args.bench_args.split()]
        print(f"== bench_index: {' '.join(bench)}", flush=True)
        subprocess.run(bench, check=True)
    result = {"images": n, "stages": records, "disk": disk, "vectors": vectors, "auto": auto,
              "cpus": os.cpu_count(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = out / f"million_{n}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


def write_benchmarks_result(results: list[dict]) -> None:
    """``benchmarks/results/bench_million.json`` for BENCHMARKS.md from runs of several gallery
    sizes: every run's stages in one table (to read memory against size), and the bench_index
    table of each size's embeddings that was measured."""
    stages, extra, summary = [], [], []
    for result in sorted(results, key=lambda r: r["images"]):
        n = result["images"]
        stages += [{"images": n, **s} for s in result["stages"]]
        disk = result["disk"]
        summary.append(f"{n:,} images: shards {disk['shards_mb']:,} MB, index "
                       f"{disk['index_mb']:,} MB on disk")
        if result.get("auto"):
            a = result["auto"]
            summary.append(
                f"{n:,} images, `raycmr index --kind auto --target-recall {a['target_recall']}`: "
                f"chose {a['kind']} {a['params']}, recall@10 {a['recall']:.3f} at "
                f"{a['qps']:,.0f} queries/s = {a['speedup']:.1f}x exact search, measured on "
                f"{a['queries']} of the gallery's own vectors")
        index_json = RESULTS_DIR / f"bench_index_million_{n}.json"
        if index_json.exists():
            extra.append({"title": f"bench_index on the {n:,} real image embeddings, 1,000 text "
                                   "queries (captions of the last shard's images)",
                          "rows": json.loads(index_json.read_text())["rows"],
                          "columns": INDEX_COLUMNS,
                          "formats": {"recall@10": ".3f", "score_recall@10": ".3f",
                                      "x_flat": ".2f", "qps": ",.0f", "build_s": ".2f",
                                      "search_s": ".3f"}})
        summary += result.get("notes", [])  # what a person adds to a run's JSON (conditions)
    summary.append("*_uss_mb: a process's own memory (USS); *_mb without it: RSS, which also "
                   "counts the pages of Ray's shared-memory object store a process has touched "
                   "(benchmarks/memwatch.py); tree = the command, its local Ray cluster and "
                   "every worker")
    write_result(NAME, stages, {
        "title": "a gallery of N synthetic images: each stage a user command, its process tree "
                 "sampled every 0.5 s",
        "columns": ["images", *STAGE_COLUMNS], "summary": summary, "extra_tables": extra})


if __name__ == "__main__":
    sys.exit(main())
