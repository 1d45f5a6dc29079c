"""Gallery search side by side: exact FAISS (IndexFlatIP) vs IVF vs HNSW vs numpy top-k.

For each gallery size N (random unit vectors, dim 256 by default; ``--data lowrank`` adds unit
vectors of low intrinsic dimension; ``--embeddings FILE.npy`` real embeddings) it measures, on
the same query set:

* ``numpy``: ``scores = Q @ X.T`` then ``argpartition`` top-k (blocks of queries), the baseline
  a plain evaluation loop would use;
* ``flat``: exact ``IndexFlatIP`` (the reference for recall);
* ``ivf``: ``IndexIVFFlat`` trained on the gallery (``nlist`` from IndexConfig, clamped for small
  N), one row per ``--nprobe``;
* ``hnsw``: ``IndexHNSWFlat`` (``M`` from IndexConfig), one row per ``--ef-search``;
* ``ivfpq`` (when named in ``--methods``): ``IndexIVFPQ``, ``--pq-m`` bytes a vector.

Every index is built once (build seconds timed once); then all searches run interleaved:
``--repeats`` rounds, each calling every variant once with all queries, after a warm-up round.
Columns: search seconds (median over rounds), queries/s, recall@k against the exact flat search
(``|approx_top_k & exact_top_k| / k`` averaged over queries) and
``x_flat = median_r (t_flat[r] / t_variant[r])``, the speed-up over exact FAISS taken within each
round so that background load on a shared machine hits both sides of the ratio alike.
Random unit vectors in 256 dimensions are close to the worst case for IVF and HNSW (no cluster
structure: a query's nearest neighbour is barely closer than a random item), so their recall
there is a lower bound; ``lowrank`` and real embeddings show the usual picture.

    python benchmarks/bench_index.py --small            # N = 20k, 100k
    python benchmarks/bench_index.py                    # N = 100k, 1M (minutes on 2 cores)
    python benchmarks/bench_index.py --embeddings gallery.npy --sizes 0
    python benchmarks/bench_index.py --sizes 0 --embeddings gallery.npy \
        --query-embeddings text_queries.npy --embedding-sizes 100000 0   # benchmarks/bench_million.py

Besides recall@k (ids), ``score_recall@k`` counts a returned item whose exact score reaches the
exact k-th score as a hit: galleries of near-duplicates have ties that id recall counts as
misses.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

try:  # `python -m benchmarks.bench_index` from the repo root
    from benchmarks import common
except ImportError:  # `python benchmarks/bench_index.py`
    import common

from raycmr.config import IndexConfig
from raycmr.index.faiss_index import build_index, clamp_nlist, recall_at_k, search

NAME = "bench_index"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cfg = IndexConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="gallery sizes of random unit vectors (0 = none)")
    p.add_argument("--small", action="store_true", help="sizes 20000 and 100000")
    p.add_argument("--data", nargs="+", default=["random"], choices=["random", "lowrank"],
                   help="random: isotropic unit vectors (worst case for ANN); lowrank: unit "
                   "vectors near a random --intrinsic-dim subspace (closer to real embeddings)")
    p.add_argument("--intrinsic-dim", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="timed search runs (median)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--nlist", type=int, default=cfg.nlist)
    p.add_argument("--nprobe", type=int, nargs="+", default=[cfg.nprobe, 4 * cfg.nprobe, 16 * cfg.nprobe])
    p.add_argument("--hnsw-m", type=int, default=cfg.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--numpy-block", type=int, default=128, help="queries per numpy matmul block")
    p.add_argument("--methods", nargs="+", default=["numpy", "flat", "ivf", "hnsw"],
                   choices=["numpy", "flat", "ivf", "ivfpq", "hnsw"])
    p.add_argument("--pq-m", type=int, default=32,
                   help="ivfpq: bytes per vector (sub-quantizers of 8 bits)")
    p.add_argument("--embeddings", default="",
                   help=".npy [N, d] real embeddings: without --query-embeddings, --queries "
                   "random rows query the rest")
    p.add_argument("--query-embeddings", default="",
                   help=".npy [Q, d] query vectors for --embeddings (e.g. text embeddings "
                   "searching an image gallery); the first --queries rows are used")
    p.add_argument("--embedding-sizes", type=int, nargs="+", default=[0],
                   help="with --embeddings: galleries of the first n rows (0 = all rows)")
    args = common.parse_bench_args(p, argv, NAME, small={"sizes": [20_000, 100_000]})
    args.sizes = [n for n in args.sizes if n > 0]
    if not args.sizes and not args.embeddings:
        p.error("nothing to measure: give --sizes or --embeddings")
    return args


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def random_unit(n: int, dim: int, rng: np.random.Generator,
                basis: np.ndarray | None = None, noise: float = 0.1) -> np.ndarray:
    """``n`` unit vectors: isotropic Gaussian directions (``basis=None``), or ``z @ basis + noise
    * eps`` with ``z ~ N(0, I_r)`` and ``basis`` [r, dim] (low intrinsic dimension r)."""
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):  # in chunks: no float64 copy of a 1M x 256 matrix
        b = min(a + 100_000, n)
        if basis is None:
            out[a:b] = rng.standard_normal((b - a, dim), dtype=np.float32)
        else:
            z = rng.standard_normal((b - a, basis.shape[0]), dtype=np.float32)
            out[a:b] = z @ basis + noise * rng.standard_normal((b - a, dim), dtype=np.float32)
    return unit_rows(out)


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int,
               block: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by ``Q @ X.T`` and ``argpartition``, ``block`` queries at a time."""
    q_n = queries.shape[0]
    scores = np.empty((q_n, k), dtype=np.float32)
    ids = np.empty((q_n, k), dtype=np.int64)
    for a in range(0, q_n, block):
        b = min(a + block, q_n)
        s = queries[a:b] @ gallery.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        ids[a:b] = np.take_along_axis(part, order, axis=1)
        scores[a:b] = np.take_along_axis(part_s, order, axis=1)
    return scores, ids


def score_recall(gallery: np.ndarray, queries: np.ndarray, ids: np.ndarray,
                 exact_scores: np.ndarray, k: int, tol: float = 1e-5) -> float:
    """Share of the returned top-``k`` whose true score reaches the exact ``k``-th score: recall
    that counts an equally good neighbour as a hit (near-duplicate galleries have many ties)."""
    ids = np.asarray(ids)[:, :k]
    got = np.einsum("qd,qkd->qk", queries, gallery[np.clip(ids, 0, None)])
    hit = (got >= exact_scores[:, k - 1:k] - tol) & (ids >= 0)
    return float(hit.mean())


def bench_dataset(data: str, gallery: np.ndarray, queries: np.ndarray,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build every index once, then time all searches interleaved round by round."""
    n, k = gallery.shape[0], args.k
    # (method, params, build seconds, search function) per variant.
    variants: list[tuple[str, str, float | None, Callable[[], Any]]] = []

    def built(kind: str, **params: Any) -> tuple[faiss.Index, float]:
        t0 = time.perf_counter()
        index = build_index(gallery, kind, **params)
        seconds = time.perf_counter() - t0
        print(f"  {data} N={n:,}: built {kind} in {seconds:.2f}s", flush=True)
        return index, seconds

    # Exact FAISS first: it is the reference for every recall.
    def nprobe_search(index: faiss.Index, nprobe: int) -> Callable[[], Any]:
        def run() -> Any:
            index.nprobe = nprobe
            return search(index, queries, k)
        return run

    flat, flat_build = built("flat")
    exact_scores, exact_ids = search(flat, queries, k)
    if "flat" in args.methods:
        variants.append(("flat", "IndexFlatIP", flat_build, lambda: search(flat, queries, k)))
    if "numpy" in args.methods:
        variants.append(("numpy", f"matmul+argpartition b={args.numpy_block}", None,
                         lambda: numpy_topk(gallery, queries, k, args.numpy_block)))
    if "ivf" in args.methods:
        nlist = clamp_nlist(args.nlist, n)
        ivf, ivf_build = built("ivf", nlist=nlist, nprobe=args.nprobe[0])
        for nprobe in sorted({min(p, nlist) for p in args.nprobe}):
            variants.append(("ivf", f"nlist={nlist} nprobe={nprobe}", ivf_build,
                             nprobe_search(ivf, nprobe)))
    if "ivfpq" in args.methods:
        nlist = clamp_nlist(args.nlist, n)
        t0 = time.perf_counter()
        pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(gallery.shape[1]), gallery.shape[1], nlist,
                              args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        pq.train(gallery)
        pq.add(gallery)
        pq_build = time.perf_counter() - t0
        print(f"  {data} N={n:,}: built ivfpq in {pq_build:.2f}s", flush=True)
        for nprobe in sorted({min(p, nlist) for p in args.nprobe}):
            variants.append(("ivfpq", f"nlist={nlist} m={args.pq_m} nprobe={nprobe}", pq_build,
                             nprobe_search(pq, nprobe)))
    if "hnsw" in args.methods:
        hnsw, hnsw_build = built("hnsw", hnsw_m=args.hnsw_m,
                                 ef_construction=args.ef_construction, ef_search=args.ef_search[0])

        def hnsw_search(ef: int) -> Callable[[], Any]:
            def run() -> Any:
                hnsw.hnsw.efSearch = ef
                return search(hnsw, queries, k)
            return run

        for ef in args.ef_search:
            variants.append(("hnsw", f"M={args.hnsw_m} efC={args.ef_construction} ef={ef}",
                             hnsw_build, hnsw_search(ef)))

    recalls, score_recalls = {}, {}
    for _, params, _, fn in variants:
        ids = fn()[1]
        recalls[params] = recall_at_k(ids, exact_ids, k)
        score_recalls[params] = score_recall(gallery, queries, ids, exact_scores, k)
    times = common.time_interleaved({params: fn for _, params, _, fn in variants}, args.repeats,
                             warmup=0)  # the recall calls above were the warm-up
    flat_times = times.get("IndexFlatIP")
    rows: list[dict[str, Any]] = []
    for method, params, build_s, _ in variants:
        t = times[params]
        search_s = statistics.median(t)
        rows.append({
            "data": data, "N": n, "dim": gallery.shape[1], "method": method, "params": params,
            "build_s": build_s, "search_s": search_s, "qps": queries.shape[0] / search_s,
            f"recall@{k}": recalls[params],
            f"score_recall@{k}": score_recalls[params],
            # speed relative to exact FAISS, taken within each round, then the median
            "x_flat": (statistics.median(f / m for f, m in zip(flat_times, t))
                       if flat_times else None),
            "search_s_all": t,
        })
        print(f"  {data} N={n:,} {method:5s} {params:26s} search={search_s:7.3f}s "
              f"qps={rows[-1]['qps']:10.1f} recall@{k}={recalls[params]:.3f} "
              f"x_flat={rows[-1]['x_flat'] or 0:.2f}", flush=True)
    del variants
    gc.collect()
    return rows


def bench_embeddings(args: argparse.Namespace, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Real embeddings: the gallery's first n rows for each ``--embedding-sizes`` n, queried by
    ``--query-embeddings`` (or by held-out random rows of the gallery file)."""
    emb = unit_rows(np.load(args.embeddings, mmap_mode="r"))
    if emb.ndim != 2:
        raise SystemExit(f"{args.embeddings}: need a 2-D array, got shape {emb.shape}")
    name = os.path.basename(args.embeddings)
    if args.query_embeddings:
        queries = unit_rows(np.load(args.query_embeddings)[:args.queries])
        gallery = emb
    else:
        if emb.shape[0] <= args.queries:
            raise SystemExit(f"{args.embeddings}: need more than {args.queries} rows, got "
                             f"{emb.shape[0]}")
        perm = rng.permutation(emb.shape[0])
        queries, gallery = emb[perm[:args.queries]], emb[np.sort(perm[args.queries:])]
    if queries.shape[1] != gallery.shape[1]:
        raise SystemExit(f"queries have dim {queries.shape[1]}, the gallery {gallery.shape[1]}")
    args.dim = gallery.shape[1]
    rows: list[dict[str, Any]] = []
    for n in args.embedding_sizes:
        part = np.ascontiguousarray(gallery if n <= 0 else gallery[:n])
        rows += bench_dataset(name, part, np.ascontiguousarray(queries), args)
        del part
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    load_at_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(f"threads pinned to {args.threads}: {threads}; queries={args.queries} k={args.k} "
          f"repeats={args.repeats} (median)", flush=True)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    for data in args.data:
        basis = None
        if data == "lowrank":
            r = args.intrinsic_dim
            basis = rng.standard_normal((r, args.dim), dtype=np.float32) / np.float32(np.sqrt(r))
        queries = random_unit(args.queries, args.dim, rng, basis)
        for n in args.sizes:
            gallery = random_unit(n, args.dim, rng, basis)
            rows += bench_dataset(data if basis is None else f"lowrank{args.intrinsic_dim}",
                                  gallery, queries, args)
            del gallery
            gc.collect()
    if args.embeddings:
        rows += bench_embeddings(args, rng)
    meta = {"threads_applied": threads,
            "search_timing": f"all queries in one call; {args.repeats} rounds after a warm-up "
            "round, every variant once per round (interleaved); search_s = median; x_flat = "
            "median over rounds of t_flat / t_variant", "build_timing": "once",
            "loadavg_at_start": load_at_start, "faiss_version": faiss.__version__}
    print()
    common.print_table(rows, ["data", "N", "method", "params", "build_s", "search_s", "qps",
                       f"recall@{args.k}", f"score_recall@{args.k}", "x_flat"],
                formats={f"recall@{args.k}": ".3f", f"score_recall@{args.k}": ".3f",
                         "x_flat": ".2f", "qps": ",.0f",
                         "build_s": ".2f", "search_s": ".3f"},
                title=f"index search, dim={args.dim}, {args.queries} queries, k={args.k}, "
                      f"{args.threads} threads")
    return common.save_run(args, rows, meta)


if __name__ == "__main__":
    sys.exit(main())
