"""FAISS index build/search/save/load: exactness of flat, recall of IVF/HNSW, round trips."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from raycmr.config import IndexConfig
from raycmr.index.faiss_index import (
    build_index,
    build_index_from_config,
    clamp_nlist,
    gpu_available,
    index_kind,
    load_index,
    recall_at_k,
    save_index,
    search,
    to_gpu,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _unit(rng, 5000, 32), _unit(rng, 200, 32)


def test_flat_equals_numpy_topk(data) -> None:
    gallery, queries = data[0][:2000], data[1][:50]
    scores, ids = search(build_index(gallery, "flat"), queries, 10)
    sim = queries.astype(np.float64) @ gallery.astype(np.float64).T
    ref_ids = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, ref_ids, axis=1), atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    # k larger than the gallery is clamped to it.
    _, ids_all = search(build_index(gallery[:7], "flat"), queries[:2], 50)
    assert ids_all.shape == (2, 7)


@pytest.mark.parametrize(
    "kind,params",
    [("hnsw", {"hnsw_m": 32, "ef_search": 64}), ("ivf", {"nlist": 32, "nprobe": 16})],
)
def test_approximate_recall_vs_flat(data, kind: str, params: dict) -> None:
    gallery, queries = data
    _, exact = search(build_index(gallery, "flat"), queries, 10)
    index = build_index(gallery, kind, **params)
    assert index_kind(index) == kind
    scores, ids = search(index, queries, 10)
    assert recall_at_k(ids, exact, 10) > 0.9
    # Scores are inner products (not L2 distances) of the returned rows.
    dots = np.einsum("qd,qkd->qk", queries, gallery[ids])
    np.testing.assert_allclose(scores, dots, atol=1e-5)


def test_ivf_nlist_is_clamped_for_small_n(data) -> None:
    assert clamp_nlist(1024, 5000) == 5000 // 39
    assert clamp_nlist(1024, 10) == 1
    with pytest.warns(UserWarning, match="nlist=1024 is too many cells"):
        index = build_index(data[0][:390], "ivf", nlist=1024, nprobe=64)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nlist == 10 and ivf.nprobe == 10  # nprobe clamped to nlist: exhaustive here
    _, ids = search(index, data[1][:20], 5)
    _, exact = search(build_index(data[0][:390]), data[1][:20], 5)
    np.testing.assert_array_equal(ids, exact)


def test_missing_hits_are_marked(data) -> None:
    # One probed cell of ~39 vectors cannot fill k=100: the rest is id -1, score -FLT_MAX.
    index = build_index(data[0][:390], "ivf", nlist=10, nprobe=1)
    scores, ids = search(index, data[1][:3], 100)
    missing = ids == -1
    assert missing.any() and (~missing).any()
    assert np.all(scores[missing] == -np.finfo(np.float32).max)
    assert np.all(missing[:, 1:] >= missing[:, :-1])  # real hits first, fillers at the end


def test_build_from_config(data) -> None:
    index = build_index_from_config(data[0][:1000], IndexConfig(kind="hnsw", hnsw_m=8))
    assert index_kind(index) == "hnsw" and index.ntotal == 1000


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, data, kind: str) -> None:
    gallery, queries = data[0][:1500], data[1]
    index = build_index(gallery, kind, nlist=16, nprobe=5, ef_search=40)
    ids = [f"img-{i:05d}" for i in range(len(gallery))]
    before = search(index, queries, 10)
    save_index(index, ids, tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {
        "index.faiss", "ids.parquet", "meta.json"}
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert (meta["kind"], meta["dim"], meta["count"]) == (kind, 32, 1500)
    loaded, loaded_ids = load_index(tmp_path / "idx")
    assert loaded_ids == ids
    after = search(loaded, queries, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    if kind == "ivf":
        assert meta["params"] == {"nlist": 16, "nprobe": 5}
        assert loaded.nprobe == 5
    if kind == "hnsw":
        assert loaded.hnsw.efSearch == 40


def test_clear_errors(tmp_path, data) -> None:
    gallery = data[0][:100]
    index = build_index(gallery)
    with pytest.raises(ValueError, match="query dim 16 does not match the index dim 32"):
        search(index, np.zeros((3, 16), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="empty"):
        build_index(np.zeros((0, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        search(index, np.zeros((0, 32), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="2-D"):
        build_index(np.zeros(32, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((4, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown"):
        build_index(gallery, kind="lsh")
    with pytest.raises(ValueError, match="one id per row"):
        save_index(index, ["a", "b"], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="missing index.faiss, ids.parquet, meta.json"):
        load_index(tmp_path / "nothing")


@pytest.mark.skipif(gpu_available(), reason="checks the CPU-only error path")
def test_to_gpu_without_gpu_raises(data) -> None:
    with pytest.raises(RuntimeError, match="CPU-only build|sees no GPU"):
        to_gpu(build_index(data[0][:10]))
