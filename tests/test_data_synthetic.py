"""Synthetic generator: determinism, captions true to the attributes, pixels true to the scene."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycmr.data.synthetic import (
    COLOUR_NAMES,
    COLOURS,
    POSITION_PHRASES,
    SHAPES,
    generate,
    layout,
    write_synthetic_split,
    write_synthetic_splits,
)

_GROUP_RE = re.compile(
    r"(a|two) (small|large) (" + "|".join(COLOUR_NAMES) + r") (" + "|".join(SHAPES) + r")(?:e?s)? "
    r"(" + "|".join(POSITION_PHRASES.values()) + r")"
)
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(text: str) -> tuple:
    """Caption -> the scene key it describes (sorted (position, count, size, colour, shape))."""
    groups = [
        (_PHRASE_TO_POS[pos], 1 if cnt == "a" else 2, size, colour, shape)
        for cnt, size, colour, shape, pos in _GROUP_RE.findall(text)
    ]
    return tuple(sorted(groups))


def test_same_seed_same_bytes_different_seed_differs():
    a = list(generate(20, seed=3, captions_per_image=2))
    b = list(generate(20, seed=3, captions_per_image=2))
    c = list(generate(20, seed=4, captions_per_image=2))
    assert [r.image for r in a] == [r.image for r in b]
    assert [r.captions for r in a] == [r.captions for r in b]
    assert sum(ra.image != rc.image for ra, rc in zip(a, c)) == 20
    assert sum(ra.captions != rc.captions for ra, rc in zip(a, c)) >= 18


def test_captions_describe_the_scene_and_label_is_main_colour():
    records = list(generate(200, seed=0, captions_per_image=3))
    for rec in records:
        assert 1 <= len(rec.scene.groups) <= 3
        for text in rec.captions:
            assert parse_caption(text) == rec.scene.key(), text
        assert rec.scene.label == COLOUR_NAMES.index(rec.scene.groups[0].colour)
    # all five templates are used
    def template(text: str) -> str:
        for prefix in ("a picture of ", "there is ", "an image showing "):
            if text.startswith(prefix):
                return prefix
        return "background" if text.endswith(" background") else "plain"

    counts = {template(c) for r in records for c in r.captions}
    assert len(counts) == 5


def test_pixels_match_the_scene():
    for rec in generate(100, seed=1, image_size=64):
        arr = np.asarray(Image.open(io.BytesIO(rec.image)).convert("RGB")).astype(int)
        assert arr.shape == (64, 64, 3)
        for group in rec.scene.groups:
            centres, _ = layout(group, 64)
            for x, y in centres:
                pixel = arr[int(y), int(x)]
                assert np.abs(pixel - np.array(COLOURS[group.colour])).max() <= 20, (rec, group)


def test_held_out_descriptions_are_mostly_distinct():
    keys = [r.scene.key() for r in generate(500, seed=0, split="test")]
    assert len(set(keys)) >= 480


def test_jpeg_format_and_image_size():
    rec = next(generate(1, seed=0, image_size=96, image_format="jpeg"))
    assert rec.image[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(rec.image)).size == (96, 96)
    with pytest.raises(ValueError, match="png or jpeg"):
        next(generate(1, seed=0, image_format="gif"))


def test_write_splits_summary_counts(tmp_path):
    out = write_synthetic_splits(tmp_path, 23, 7, 5, seed=0, captions_per_image=2,
                                 rows_per_shard=10, progress=False)
    assert {k: (s.rows, s.shards) for k, s in out.items()} == {
        "train": (46, 5), "val": (14, 2), "test": (10, 1)}
    for split, summary in out.items():
        files = sorted((tmp_path / split).glob("part-*.parquet"))
        assert [str(f) for f in files] == summary.files
        assert summary.bytes == sum(f.stat().st_size for f in files)
        table = pq.read_table(files)
        assert table.num_rows == summary.rows
        assert table.column_names == ["id", "image", "caption", "image_id", "label", "domain"]
        ids = table.column("image_id").to_pylist()
        assert all(ids.count(i) == 2 for i in ids)  # two captions per image share image_id
        assert len(set(table.column("id").to_pylist())) == summary.rows
    # splits draw from disjoint seeds: no identical image bytes across train and test
    train = set(pq.read_table(tmp_path / "train").column("image").to_pylist())
    test = set(pq.read_table(tmp_path / "test").column("image").to_pylist())
    assert not train & test


def test_parallel_writer_writes_the_same_files_as_one_process(tmp_path):
    one = write_synthetic_split(tmp_path / "one", "train", 47, seed=1, captions_per_image=2,
                                rows_per_shard=8, image_size=16, progress=False)
    two = write_synthetic_split(tmp_path / "two", "train", 47, seed=1, captions_per_image=2,
                                rows_per_shard=8, image_size=16, progress=False, workers=2)
    assert (two.rows, two.shards, two.bytes) == (one.rows, one.shards, one.bytes) == \
        (94, 12, one.bytes)
    names = [f.name for f in sorted((tmp_path / "one").glob("part-*.parquet"))]
    assert [f.split("/")[-1] for f in two.files] == names
    for name in names:
        assert pq.read_table(tmp_path / "two" / name).equals(pq.read_table(tmp_path / "one" / name))
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_synthetic_split(tmp_path / "two", "train", 47, seed=1, workers=2,
                              rows_per_shard=8, progress=False)
    with pytest.raises(ValueError, match="multiple of --captions-per-image"):
        write_synthetic_split(tmp_path / "three", "train", 47, seed=1, captions_per_image=3,
                              rows_per_shard=8, progress=False, workers=2)
