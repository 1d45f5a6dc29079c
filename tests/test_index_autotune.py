"""``--kind auto``: the chosen index reaches the target recall on the gallery's own vectors, the
reported recall is what an independent brute-force check measures, and it is the fastest
setting that qualifies."""

from __future__ import annotations

import numpy as np
import pytest

from raycmr.index.autotune import choose_index
from raycmr.index.faiss_index import index_kind, load_index, save_index


def _clustered(n: int, d: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: structure like real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall_by_numpy(index, x: np.ndarray, rows: np.ndarray, k: int) -> float:
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf  # the query itself is not its neighbour
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    _, ids = index.search(x[rows], k + 1)
    hits = [len(set(i[i != r][:k].tolist()) & set(t.tolist())) for i, r, t in zip(ids, rows, truth)]
    return float(np.mean(hits)) / k


def test_auto_meets_the_target_and_reports_what_it_measured(tmp_path):
    x = _clustered(6000)
    index, choice = choose_index(x, 0.9, k=10, queries=300, small_gallery=1000)
    assert choice.kind in ("hnsw", "ivf") and index_kind(index) == choice.kind
    assert choice.recall >= 0.9
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=300, replace=False))
    assert _recall_by_numpy(index, x, rows, 10) == pytest.approx(choice.recall, abs=1e-9)
    qualifying = [t for t in choice.trials if t.recall >= 0.9]
    assert choice.qps == max(t.qps for t in qualifying)
    assert any(t.recall < 0.9 for t in choice.trials)  # the sweep reached below the target too
    save_index(index, [str(i) for i in range(len(x))], tmp_path / "idx",
               extra_meta={"auto": choice.meta()})
    loaded, _ = load_index(tmp_path / "idx")
    meta = __import__("json").loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["auto"]["recall"] == choice.recall and meta["auto"]["kind"] == choice.kind
    assert _recall_by_numpy(loaded, x, rows, 10) == pytest.approx(choice.recall, abs=1e-9)


def test_small_gallery_or_exact_target_is_flat():
    x = _clustered(800)
    index, choice = choose_index(x, 0.95, small_gallery=1000)
    assert choice.kind == "flat" and index_kind(index) == "flat" and choice.recall == 1.0
    _, choice = choose_index(_clustered(3000), 1.0, queries=50, small_gallery=1000)
    assert choice.kind == "flat"
    with pytest.raises(ValueError, match="target recall"):
        choose_index(x, 1.5)


def test_describe_index_states_what_auto_measured():
    from raycmr.index.autotune import describe_index

    x = _clustered(3000)
    _, choice = choose_index(x, 0.9, queries=100, small_gallery=1000)
    line = describe_index({"kind": choice.kind, "count": 3000, "dim": 32,
                           "params": choice.params, "auto": choice.meta()})
    assert line.startswith(f"{choice.kind} over 3,000 vectors of dim 32")
    assert f"recall@10 {choice.recall:.3f} (target 0.90)" in line
    assert f"{choice.speedup:.1f}x exact search" in line
    assert describe_index({"kind": "flat", "count": 5, "dim": 4, "params": {}}) == \
        "flat over 5 vectors of dim 4"
