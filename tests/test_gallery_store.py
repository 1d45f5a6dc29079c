"""The streaming path of `raycmr index` (raycmr/index/gallery_store.py): rows by sorted id, blocks
written in any order with repeats, assembled on disk and added to FAISS chunk by chunk, equal
to building the index from the id-ordered matrix in memory."""

from __future__ import annotations

import io

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycmr.config import IndexConfig
from raycmr.data.transforms import stable_hash63
from raycmr.index.faiss_index import build_index, load_index, save_index
from raycmr.index.gallery_store import (
    BLOCK_PREFIX,
    GalleryRows,
    assemble_embeddings,
    build_index_from_file,
    scan_gallery_rows,
)


def _write_ids(path, ids, image_ids) -> None:
    pq.write_table(pa.table({"id": ids, "image_id": image_ids}), path)


def test_scan_gallery_rows_sorts_ids_and_keeps_each_image_once(tmp_path) -> None:
    # two captions of "b" in file 1, image "a" in both files, "r3" has no image_id
    _write_ids(tmp_path / "1.parquet", ["r0", "r1", "r2", "r3"], ["b", "b", "a", None])
    _write_ids(tmp_path / "2.parquet", ["r4", "r5"], ["a", "c"])
    rows = scan_gallery_rows([str(tmp_path / "1.parquet"), str(tmp_path / "2.parquet")],
                             "parquet")
    assert rows.names.to_pylist() == ["a", "b", "c", "r3"]
    assert rows.groups.tolist() == [stable_hash63(n) for n in ["a", "b", "c", "r3"]]
    probe = np.array([stable_hash63("c"), 12345, stable_hash63("a"), stable_hash63("r3")])
    assert rows.lookup(probe).tolist() == [2, -1, 0, 3]


def test_lookup_matches_a_dict_on_many_groups() -> None:
    rng = np.random.default_rng(0)
    groups = rng.choice(2**62, size=5000, replace=False).astype(np.int64)
    rows = GalleryRows(pa.array([str(g) for g in groups]), groups)
    reference = {int(g): i for i, g in enumerate(groups)}
    probe = np.concatenate([rng.choice(groups, 3000), rng.integers(0, 2**62, 500)])
    expect = [reference.get(int(g), -1) for g in probe]
    assert rows.lookup(probe).tolist() == expect


def _write_blocks(scratch, vectors: np.ndarray, seed: int, drop: set[int] = frozenset()) -> None:
    """Blocks of 7 rows in a shuffled order, every third row repeated in a second block."""
    rng = np.random.default_rng(seed)
    order = [r for r in rng.permutation(len(vectors)) if r not in drop]
    extra = order[::3]
    rows = np.array(order + extra)
    scratch.mkdir()
    for b, start in enumerate(range(0, len(rows), 7)):
        part = rows[start:start + 7]
        buffer = io.BytesIO()
        np.savez(buffer, rows=part, vectors=vectors[part])
        (scratch / f"{BLOCK_PREFIX}{b:04d}.npz").write_bytes(buffer.getvalue())


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_from_blocks_equals_the_in_memory_build(tmp_path, kind) -> None:
    rng = np.random.default_rng(1)
    n, d = 2000, 16
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    _write_blocks(tmp_path / "blocks", vectors, seed=2)
    table = tmp_path / "emb.f32"
    dim, filled = assemble_embeddings(str(tmp_path / "blocks"), n, table)
    assert dim == d and filled.all()
    np.testing.assert_array_equal(np.fromfile(table, np.float32).reshape(n, d), vectors)

    cfg = IndexConfig(kind=kind, nlist=16, nprobe=16, hnsw_m=8, ef_search=64)
    index = build_index_from_file(table, dim, filled, cfg, chunk=300)  # 7 chunks, last short
    assert index.ntotal == n
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, d)).astype(np.float32)
    exact = build_index(vectors, "flat")
    want_scores, want_ids = exact.search(queries, 10)
    got_scores, got_ids = index.search(queries, 10)
    if kind == "hnsw":  # approximate: the same graph up to insertion, near-exact at this size
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_ids, want_ids)]) > 0.95
    else:  # flat, and IVF probing every cell: exact
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    if kind == "flat":
        np.testing.assert_array_equal(index.reconstruct_n(0, n), vectors)


def test_rows_without_a_vector_are_left_out_in_order(tmp_path) -> None:
    n, d = 100, 4
    vectors = np.arange(n * d, dtype=np.float32).reshape(n, d)
    missing = {0, 17, 99}
    _write_blocks(tmp_path / "blocks", vectors, seed=3, drop=missing)
    dim, filled = assemble_embeddings(str(tmp_path / "blocks"), n, tmp_path / "emb.f32")
    assert sorted(np.flatnonzero(~filled).tolist()) == sorted(missing)
    index = build_index_from_file(tmp_path / "emb.f32", dim, filled, IndexConfig(kind="flat"),
                                  chunk=16)
    keep = [r for r in range(n) if r not in missing]
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), vectors[keep])


def test_save_index_takes_arrow_ids_and_round_trips(tmp_path) -> None:
    vectors = np.eye(3, dtype=np.float32)
    index = faiss.IndexFlatIP(3)
    index.add(vectors)
    save_index(index, pa.array(["x", "y", "z"]), tmp_path / "ix")
    loaded, ids = load_index(tmp_path / "ix")
    assert ids == ["x", "y", "z"]
    np.testing.assert_array_equal(loaded.reconstruct_n(0, 3), vectors)
    with pytest.raises(ValueError, match="got 2 ids for an index of 3 vectors"):
        save_index(index, pa.array(["x", "y"]), tmp_path / "bad")
