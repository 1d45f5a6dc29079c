"""FAISS inner-product indexes over a gallery of embeddings, with an id table on disk.

Scores are inner products ``s(q, x) = <q, x>``; with L2-normalised embeddings (what the dual
encoder produces) this is cosine similarity. Three kinds:

* ``flat``: exact search (``IndexFlatIP``), O(N d) per query.
* ``ivf``: ``IndexIVFFlat``; k-means on the gallery into ``nlist`` cells, a query scans the
  ``nprobe`` cells whose centroids score highest. Approximate; recall rises with nprobe/nlist.
* ``hnsw``: ``IndexHNSWFlat`` graph with ``M = hnsw_m`` links per node; a query explores
  ``ef_search`` candidates. Approximate, no training, the fastest at high recall on CPU.

On disk an index is a directory (:mod:`raycmr.artifacts`, local or object store):
``index.faiss`` (``faiss.serialize_index``), ``ids.parquet`` (an id table: ``row`` int64 ->
``id`` string, one row per indexed vector) and ``meta.json`` (kind, dim, count, metric and the
build/search parameters).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from raycmr import artifacts

KINDS = ("flat", "ivf", "hnsw")
MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per IVF cell


def _as_float32(x: Any, name: str) -> np.ndarray:
    """C-contiguous float32 [n, d] copy-free where possible; clear errors for bad input."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); nothing to index or search")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf values; check the embeddings")
    return arr


def clamp_nlist(nlist: int, n: int) -> int:
    """IVF cell count usable with ``n`` training points: ``min(nlist, max(1, n // 39))``.

    FAISS k-means wants >= 39 points per centroid; fewer gives empty or poorly placed cells.
    """
    return max(1, min(int(nlist), n // MIN_POINTS_PER_CENTROID))


def new_index(kind: str, d: int, n: int, nlist: int = 1024, nprobe: int = 16,
              hnsw_m: int = 32, ef_search: int = 64, ef_construction: int = 80) -> faiss.Index:
    """An empty inner-product FAISS index of ``kind`` for ``n`` vectors of dim ``d`` (IVF still
    to be trained): ``nlist`` is clamped with a warning to :func:`clamp_nlist` for small ``n``
    and ``nprobe`` to ``nlist``; HNSW has ``hnsw_m`` links per node, ``ef_construction`` while
    building and ``ef_search`` at query time."""
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "ivf":
        if nlist <= 0 or nprobe <= 0:
            raise ValueError(f"ivf needs nlist > 0 and nprobe > 0, got {nlist} and {nprobe}")
        use_nlist = clamp_nlist(nlist, n)
        if use_nlist != nlist:
            warnings.warn(
                f"ivf: nlist={nlist} is too many cells for {n} vectors (FAISS wants >= "
                f"{MIN_POINTS_PER_CENTROID} per cell); using nlist={use_nlist}",
                stacklevel=3,
            )
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, use_nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(int(nprobe), use_nlist)
        return index
    if hnsw_m < 2:
        raise ValueError(f"hnsw needs hnsw_m >= 2, got {hnsw_m}")
    index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    index.hnsw.efSearch = int(ef_search)
    return index


def build_index(
    emb: Any,
    kind: str = "flat",
    nlist: int = 1024,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 64,
    ef_construction: int = 80,
) -> faiss.Index:
    """An inner-product FAISS index holding ``emb`` [N, d] (row i gets id i): :func:`new_index`
    with these parameters; ``ivf`` trains its coarse quantizer on ``emb`` itself."""
    x = _as_float32(emb, "emb")
    n, d = x.shape
    index = new_index(kind, d, n, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                      ef_search=ef_search, ef_construction=ef_construction)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def build_index_from_config(emb: Any, cfg: Any) -> faiss.Index:
    """:func:`build_index` with ``kind, nlist, nprobe, hnsw_m, ef_search`` from an
    ``IndexConfig``."""
    return build_index(emb, kind=cfg.kind, nlist=cfg.nlist, nprobe=cfg.nprobe, hnsw_m=cfg.hnsw_m,
                       ef_search=cfg.ef_search)


def index_kind(index: faiss.Index) -> str:
    """``"flat"``, ``"ivf"`` or ``"hnsw"`` for an index built here (CPU or GPU)."""
    idx = faiss.downcast_index(index)
    name = type(idx).__name__
    if "HNSW" in name:
        return "hnsw"
    if "IVF" in name:
        return "ivf"
    if "Flat" in name:
        return "flat"
    raise ValueError(f"unsupported FAISS index type {name}")


def search(index: faiss.Index, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: ``(scores [Q, k] float32, ids [Q, k] int64)``, best first.

    ``k`` is clamped to the index size. Approximate indexes may return fewer than k hits for a
    query (IVF when the probed cells hold fewer than k vectors); the missing slots hold id -1
    and score -3.4028235e38 (``-FLT_MAX``, FAISS's filler for inner product).
    """
    q = _as_float32(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(
            f"query dim {q.shape[1]} does not match the index dim {index.d}; embed the queries "
            "with the model that built the index"
        )
    if index.ntotal == 0:
        raise ValueError("the index is empty; add vectors before searching")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    scores, ids = index.search(q, min(int(k), int(index.ntotal)))
    return scores, ids


def _index_params(index: faiss.Index) -> dict[str, int]:
    idx = faiss.downcast_index(index)
    kind = index_kind(idx)
    if kind == "ivf":
        return {"nlist": int(idx.nlist), "nprobe": int(idx.nprobe)}
    if kind == "hnsw":
        return {
            "hnsw_m": int(idx.hnsw.nb_neighbors(1)),
            "ef_search": int(idx.hnsw.efSearch),
            "ef_construction": int(idx.hnsw.efConstruction),
        }
    return {}


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (the index itself when it already lives on the CPU)."""
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(faiss.downcast_index(index)).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def save_index(index: faiss.Index, ids: list[str], directory: str | Path,
               extra_meta: dict[str, Any] | None = None) -> str:
    """Write ``index.faiss``, ``ids.parquet`` and ``meta.json`` into ``directory`` (a local path,
    created, or an object-store URI) through :mod:`raycmr.artifacts`.

    ``ids[i]`` is the external id (e.g. an image key) of the vector at row ``i`` (a sequence or
    a pyarrow string array); ``extra_meta``
    adds keys to meta.json (e.g. ``auto``: the measurements behind ``--kind auto``).
    """
    if len(ids) != index.ntotal:
        raise ValueError(
            f"got {len(ids)} ids for an index of {index.ntotal} vectors; give one id per row"
        )
    cpu = to_cpu(index)
    meta = {
        "kind": index_kind(cpu),
        "dim": int(cpu.d),
        "count": int(cpu.ntotal),
        "metric": "inner_product",
        "params": _index_params(cpu),
        "faiss_version": faiss.__version__,
        **(extra_meta or {}),
    }

    def write(path: str) -> None:
        if artifacts.is_remote(path):  # one serialised copy, written as it is (no .tobytes())
            artifacts.write_bytes(path, faiss.serialize_index(cpu))
        else:  # straight to the file: no copy of the index in memory
            local = Path(path.removeprefix("file://")).expanduser()
            local.parent.mkdir(parents=True, exist_ok=True)
            faiss.write_index(cpu, str(local))

    return artifacts.write_index_folder(directory, write, ids, meta)


def load_index(directory: str | Path) -> tuple[faiss.Index, list[str]]:
    """Read a directory written by :func:`save_index`: ``(index, ids)`` (CPU index).

    Search-time parameters (IVF ``nprobe``, HNSW ``efSearch``) are restored from meta.json.
    """
    data, ids, meta = artifacts.read_index_folder(directory)
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != meta["count"] or len(ids) != index.ntotal or index.d != meta["dim"]:
        raise ValueError(
            f"{directory} is inconsistent: index has {index.ntotal} vectors of dim {index.d}, ids "
            f"table {len(ids)} rows, meta.json count={meta['count']} dim={meta['dim']}; rebuild it"
        )
    params = meta.get("params", {})
    # deserialize_index already returns the concrete class; a downcast_index() wrapper would not
    # own the C++ object, which is freed with the original wrapper.
    if meta["kind"] == "ivf" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if meta["kind"] == "hnsw" and "ef_search" in params:
        index.hnsw.efSearch = int(params["ef_search"])
    return index, ids


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """A copy of ``index`` on GPU ``device`` (flat and IVF; FAISS has no GPU HNSW).

    Raises RuntimeError when the installed faiss has no GPU support or sees no GPU.
    """
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError(
            f"the installed faiss {faiss.__version__} is a CPU-only build; install faiss-gpu "
            "(`pip install raycmr[gpu]`) or keep the index on the CPU"
        )
    n_gpus = faiss.get_num_gpus()
    if n_gpus == 0:
        raise RuntimeError("faiss has GPU support but sees no GPU; keep the index on the CPU")
    if not 0 <= device < n_gpus:
        raise RuntimeError(f"GPU {device} requested but faiss sees {n_gpus} GPU(s)")
    if index_kind(index) == "hnsw":
        raise RuntimeError("FAISS has no GPU HNSW index; use kind=flat or ivf for GPU search")
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, device, index)
    gpu_index.referenced_objects = [res]  # keep the resources alive as long as the index
    return gpu_index


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx_top_k & exact_top_k| / k`` (recall@k vs exact search)."""
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    hits = [len(set(ai.tolist()) & set(ei.tolist())) for ai, ei in zip(a, e)]
    return float(np.mean(hits) / k)
