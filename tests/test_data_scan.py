"""The one shard scanner (raycmr/data/scan.py) and its two readers: each row named by image_id
else row id, located by (row group, row) or the tar member's byte range, captions on request;
the index's gallery rows (one per image, sorted) and the Serve app's GalleryStore (thumbnails
and captions) built from it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raycmr.data.scan import ShardRow, scan_shard
from raycmr.index.gallery_store import scan_gallery_rows
from raycmr.serve.gallery import GalleryStore

# id, image_id, image bytes, caption
PARQUET_ROWS = [("r0", "cat", b"\x89PNG-0", "a cat"), ("r1", "cat", b"\x89PNG-1", "the cat"),
                ("r2", "", b"\x89PNG-2", "  "), ("r3", None, b"\x89PNG-3", "a dog"),
                ("r4", "owl", b"\x89PNG-4", None)]
# key, json metadata (None: no .json), image bytes (None: no image member), caption
TAR_SAMPLES = [("k0", {"image_id": "cat"}, b"\xff\xd8\xff-k0", "a cat"),
               ("k1", {"image_id": "cat"}, b"\xff\xd8\xff-k1", "the cat"),
               ("k2", None, b"\xff\xd8\xff-k2", "a dog"),
               ("k3", {"label": 1}, b"\xff\xd8\xff-k3", ""),
               ("k4", None, None, "no image here")]


def _parquet(path) -> str:
    ids, image_ids, images, captions = (list(c) for c in zip(*PARQUET_ROWS))
    pq.write_table(pa.table({"id": ids, "image": images, "caption": captions,
                             "image_id": image_ids}), path, row_group_size=2)
    return str(path)


def _tar(path) -> str:
    with tarfile.open(path, "w") as tar:
        for key, meta, image, caption in TAR_SAMPLES:
            members = {"txt": caption.encode()}
            if image is not None:
                members["jpg"] = image
            if meta is not None:
                members["json"] = json.dumps(meta).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_scan_shard_names_and_locates_every_row(tmp_path) -> None:
    parquet = _parquet(tmp_path / "part-0.parquet")
    assert list(scan_shard(parquet, "parquet", captions=True)) == [
        ShardRow("cat", (0, 0), "a cat"), ShardRow("cat", (0, 1), "the cat"),
        ShardRow("r2", (1, 0), "  "), ShardRow("r3", (1, 1), "a dog"),
        ShardRow("owl", (2, 0), None)]
    assert [r.caption for r in scan_shard(parquet, "parquet")] == [None] * 5

    tar = _tar(tmp_path / "shard-0.tar")
    rows = list(scan_shard(tar, "webdataset", captions=True))
    assert [(r.name, r.caption) for r in rows] == [
        ("cat", "a cat"), ("cat", "the cat"), ("k2", "a dog"), ("k3", ""), ("k4", "no image here")]
    data = Path(tar).read_bytes()
    assert [data[r.where[0]:r.where[0] + r.where[1]] if r.where else None for r in rows] == \
        [image for _, _, image, _ in TAR_SAMPLES]
    assert [r.caption for r in scan_shard(tar, "webdataset")] == [None] * 5


def test_index_rows_and_serve_store_read_the_same_names(tmp_path) -> None:
    parquet = _parquet(tmp_path / "part-0.parquet")
    tar = _tar(tmp_path / "shard-0.tar")
    # the index: one row per image (the first row of each name), sorted by name
    assert scan_gallery_rows([parquet], "parquet").names.to_pylist() == ["cat", "owl", "r2", "r3"]
    assert scan_gallery_rows([tar], "webdataset").names.to_pylist() == ["cat", "k2", "k3", "k4"]

    store = GalleryStore.scan([parquet])
    assert {n: store.image(n) for n in store.where} == {
        "cat": b"\x89PNG-0", "r2": b"\x89PNG-2", "r3": b"\x89PNG-3", "owl": b"\x89PNG-4"}
    assert store.captions == [("cat", "a cat"), ("cat", "the cat"), ("r3", "a dog")]
    assert store.image("missing") is None

    store = GalleryStore.scan([tar])  # k4 has no image: neither a thumbnail nor a caption
    assert {n: store.image(n) for n in store.where} == {
        "cat": b"\xff\xd8\xff-k0", "k2": b"\xff\xd8\xff-k2", "k3": b"\xff\xd8\xff-k3"}
    assert store.captions == [("cat", "a cat"), ("cat", "the cat"), ("k2", "a dog")]
