"""``--kind auto``: pick the FAISS index and its search parameter by measuring, on the gallery.

A sample of the gallery's own vectors serves as queries. Exact inner-product search
(``IndexFlatIP``) over the whole gallery gives each query's true top-``k`` neighbours (the query's
own row left out). Each candidate, an HNSW graph swept over ``efSearch`` and an IVF index swept
over ``nprobe``, answers the same queries in one batch; its recall@k is the mean fraction of the
true top-``k`` it returns, its speed queries per second over the batch. The choice is the fastest
setting whose recall reaches the target; exact search when none does or when the gallery is
small enough that exact search is cheap. The measurements travel in the index's ``meta.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from raycmr.index.faiss_index import _as_float32, build_index, clamp_nlist, recall_at_k

EF_SEARCH = (16, 32, 64, 128, 256, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMALL_GALLERY = 20_000  # below this, exact search answers a query in well under a millisecond


@dataclass
class Trial:
    kind: str
    params: dict[str, int]
    recall: float
    qps: float


@dataclass
class AutoChoice:
    kind: str
    params: dict[str, int]
    target_recall: float
    recall: float
    qps: float
    exact_qps: float
    k: int
    queries: int
    trials: list[Trial] = field(default_factory=list)
    reason: str = ""  # why exact search was kept without a sweep ("" = it was measured)

    @property
    def speedup(self) -> float:
        return self.qps / self.exact_qps if self.exact_qps > 0 else math.nan

    def meta(self) -> dict[str, Any]:
        """What ``meta.json`` records under ``auto``."""
        out = asdict(self)
        out["speedup"] = self.speedup
        return out

    def summary(self) -> str:
        if self.reason:
            return f"flat (exact search): {self.reason}"
        return (f"{self.kind} {self.params}: recall@{self.k} {self.recall:.3f} (target "
                f"{self.target_recall:.2f}) at {self.qps:,.0f} queries/s, {self.speedup:.1f}x "
                f"exact search ({self.exact_qps:,.0f}/s), measured on {self.queries} of the "
                "gallery's own vectors")


def _timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, len(queries) / max(time.perf_counter() - start, 1e-9)


def _drop_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's top-``k`` ids with the query's own row removed (searched with k + 1)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (hits, row) in enumerate(zip(ids, rows)):
        kept = hits[hits != row][:k]
        out[i, :len(kept)] = kept
    return out


def choose_index(emb: Any, target_recall: float, *, k: int = 10, queries: int = 1000,
                 seed: int = 0, hnsw_m: int = 32, nlist: int | None = None,
                 small_gallery: int = SMALL_GALLERY) -> tuple[faiss.Index, AutoChoice]:
    """Build the fastest index whose measured recall@``k`` on a sample of ``emb``'s own rows
    reaches ``target_recall``; returns it with the measurements (module docstring)."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    x = _as_float32(emb, "emb")
    n = len(x)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    q = x[rows]
    kk = min(k, n - 1) if n > 1 else 1
    exact = build_index(x, "flat")
    exact_ids, exact_qps = _timed_search(exact, q, kk + 1)
    truth = _drop_self(exact_ids, rows, kk)
    flat = AutoChoice("flat", {}, target_recall, 1.0, exact_qps, exact_qps, kk, len(rows))
    if n < small_gallery or target_recall >= 1.0:
        flat.reason = (f"the gallery holds {n:,} vectors, under {small_gallery:,}: exact search "
                       f"answers {exact_qps:,.0f} queries/s" if n < small_gallery
                       else "a target recall of 1.0 needs exact search")
        flat.trials.append(Trial("flat", {}, 1.0, exact_qps))
        return exact, flat
    trials: list[tuple[Trial, faiss.Index]] = [(Trial("flat", {}, 1.0, exact_qps), exact)]
    hnsw = build_index(x, "hnsw", hnsw_m=hnsw_m)
    for ef in EF_SEARCH:
        ef = max(ef, kk + 1)
        hnsw.hnsw.efSearch = ef
        ids, qps = _timed_search(hnsw, q, kk + 1)
        trials.append((Trial("hnsw", {"hnsw_m": hnsw_m, "ef_search": ef},
                             recall_at_k(_drop_self(ids, rows, kk), truth, kk), qps), hnsw))
    cells = clamp_nlist(nlist or max(1, int(4 * math.sqrt(n))), n)
    ivf = build_index(x, "ivf", nlist=cells, nprobe=1)
    ivf_cells = faiss.extract_index_ivf(ivf).nlist
    for nprobe in (p for p in NPROBE if p <= ivf_cells):
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        ids, qps = _timed_search(ivf, q, kk + 1)
        trials.append((Trial("ivf", {"nlist": ivf_cells, "nprobe": nprobe},
                             recall_at_k(_drop_self(ids, rows, kk), truth, kk), qps), ivf))
    good = [(t, idx) for t, idx in trials if t.recall >= target_recall]
    best, index = max(good, key=lambda pair: pair[0].qps)
    if best.kind == "hnsw":
        index.hnsw.efSearch = best.params["ef_search"]
    elif best.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = best.params["nprobe"]
    choice = AutoChoice(best.kind, best.params, target_recall, best.recall, best.qps, exact_qps,
                        kk, len(rows), [t for t, _ in trials])
    return index, choice


def describe_index(meta: dict[str, Any]) -> str:
    """One line about an index folder's ``meta.json``: kind, count, search parameters, and for
    ``--kind auto`` the recall and speed measured when it was built."""
    params = ", ".join(f"{k} {v}" for k, v in meta.get("params", {}).items())
    line = f"{meta['kind']} over {meta['count']:,} vectors of dim {meta['dim']}" + \
        (f" ({params})" if params else "")
    auto = meta.get("auto")
    if auto:
        line += (f"; chosen by --kind auto: recall@{auto['k']} {auto['recall']:.3f} (target "
                 f"{auto['target_recall']:.2f}), {auto['qps']:,.0f} queries/s = "
                 f"{auto['speedup']:.1f}x exact search, measured at build time")
    return line
