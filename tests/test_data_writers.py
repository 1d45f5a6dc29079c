"""Shard writers: rolling files, folder rejections by reason, Wikipedia features, the CLI."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import WIKIPEDIA as WIKI
from conftest import needs_wikipedia
from PIL import Image

from raycmr.data import cli as shards_cli
from raycmr.data.schema import image_shard_schema
from raycmr.data.writers import (
    ShardWriter,
    stratified_split,
    write_folder_shards,
    write_wikipedia_shards,
)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_shard_writer_rolls_and_counts(tmp_path):
    writer = ShardWriter(tmp_path / "out", image_shard_schema(["label"]), rows_per_shard=10)
    with writer:
        for i in range(25):
            writer.write({"id": str(i), "image": b"x", "caption": f"c{i}", "label": i})
        writer.reject("empty_caption", "r1")
        writer.reject("empty_caption", "r2")
        writer.reject("missing_file")
    s = writer.summary
    files = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert (s.rows, s.shards, len(files)) == (25, 3, 3)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [10, 10, 5]
    assert s.bytes == sum(f.stat().st_size for f in files)
    assert s.rejected == {"empty_caption": 2, "missing_file": 1}
    assert "rejected empty_caption: 2 (e.g. r1, r2)" in s.format()
    assert pq.read_table(files).column("label").to_pylist() == list(range(25))
    # existing shards are never silently mixed with new ones
    with pytest.raises(FileExistsError, match="already holds 3 shard"):
        ShardWriter(tmp_path / "out", image_shard_schema([]))
    w2 = ShardWriter(tmp_path / "out", image_shard_schema([]), overwrite=True)
    w2.write({"id": "a", "image": b"x", "caption": "c"})
    w2.close()
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_writer_rejects_planted_bad_records(tmp_path, fmt):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"img{i}.png").write_bytes(_png((40 * i, 10, 10)))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    records = [
        {"image": "img0.png", "caption": "first", "label": 3, "image_id": "shared"},
        {"image": "img1.png", "caption": "second", "label": 4, "image_id": "shared"},
        {"image": "img2.png", "caption": "  third  ", "label": 5},
        {"image": "gone.png", "caption": "missing file", "label": 1},
        {"image": "corrupt.jpg", "caption": "corrupt", "label": 1},
        {"image": "img3.png", "caption": "   ", "label": 1},
        {"image": "img4.png", "caption": "", "label": 1},
        {"image": "img5.png", "caption": "fifth", "label": 6},
    ]
    if fmt == "csv":
        lines = ["image,caption,label,image_id"] + [
            f"{r['image']},{r['caption']},{r['label']},{r.get('image_id', '')}" for r in records]
        captions = tmp_path / "captions.csv"
        captions.write_text("\n".join(lines) + "\n")
    else:
        captions = tmp_path / "captions.jsonl"
        captions.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = write_folder_shards(images, captions, tmp_path / "shards", rows_per_shard=3,
                                  progress=False)
    assert summary.rejected == {"missing_file": 1, "undecodable_image": 1, "empty_caption": 2}
    assert (summary.rows, summary.shards) == (4, 2)
    table = pq.read_table(tmp_path / "shards")
    assert table.column("caption").to_pylist() == ["first", "second", "third", "fifth"]
    assert table.column("label").to_pylist() == [3, 4, 5, 6]
    assert table.column("image_id").to_pylist() == ["shared", "shared", "img2.png", "img5.png"]
    assert table.column("image").to_pylist()[3] == (images / "img5.png").read_bytes()


def test_folder_writer_names_missing_caption_column(tmp_path):
    (tmp_path / "c.csv").write_text("file,text\na.png,hello\n")
    with pytest.raises(ValueError, match="lacks column.*image, caption"):
        write_folder_shards(tmp_path, tmp_path / "c.csv", tmp_path / "out")


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(4), [20, 40, 10, 30])
    a, b = stratified_split(labels, 0.1, 0), stratified_split(labels, 0.1, 0)
    assert np.array_equal(a, b)
    assert [int(a[labels == c].sum()) for c in range(4)] == [2, 4, 1, 3]
    assert not np.array_equal(a, stratified_split(labels, 0.1, 1))


@needs_wikipedia
def test_wikipedia_shards_match_the_mat_file(tmp_path):
    from scipy.io import loadmat

    out = write_wikipedia_shards(WIKI, tmp_path, val_fraction=0.15, seed=0)
    rows = {k: s.rows for k, s in out.items()}
    assert rows["train"] + rows["val"] == 2173
    assert rows["test"] == 693
    assert 0.14 < rows["val"] / 2173 < 0.16
    mat = loadmat(str(WIKI / "raw_features.mat"))
    test = pq.read_table(tmp_path / "test")
    np.testing.assert_array_equal(np.stack(test.column("image_feat").to_numpy(zero_copy_only=False)),
                                  mat["I_te"].astype(np.float32))
    np.testing.assert_array_equal(np.stack(test.column("text_feat").to_numpy(zero_copy_only=False)),
                                  mat["T_te"].astype(np.float32))
    listed = [line.split("\t") for line in
              (WIKI / "testset_txt_img_cat.list").read_text().splitlines() if line.strip()]
    assert test.column("id").to_pylist() == [t for t, _, _ in listed]
    assert test.column("label").to_pylist() == [int(c) - 1 for _, _, c in listed]
    # train + val together are exactly the published training rows, each once
    train_list = [line.split("\t")[0] for line in
                  (WIKI / "trainset_txt_img_cat.list").read_text().splitlines() if line.strip()]
    tv = pq.read_table([*sorted((tmp_path / "train").glob("*.parquet")),
                        *sorted((tmp_path / "val").glob("*.parquet"))])
    ids = tv.column("id").to_pylist()
    assert sorted(ids) == sorted(train_list)
    feats = dict(zip(ids, tv.column("image_feat").to_pylist()))
    row = train_list.index(ids[-1])
    np.testing.assert_array_equal(np.array(feats[ids[-1]], dtype=np.float32),
                                  mat["I_tr"][row].astype(np.float32))
    assert set(tv.column("label").to_pylist()) == set(range(10))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    shards_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return shards_cli.run(args)


def test_cli_synthetic_prints_summary(tmp_path, capsys):
    rc = _cli(["synthetic", "--out", str(tmp_path), "--train", "12", "--val", "3", "--test", "4",
               "--captions-per-image", "2", "--rows-per-shard", "10"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train: 24 rows, 3 shards" in out
    assert "val: 6 rows, 1 shards" in out
    assert "total: 38 rows, 5 shards" in out
    # a second run into the same dir is refused with a clear message, not a traceback
    assert _cli(["synthetic", "--out", str(tmp_path), "--train", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_folder_reports_rejections(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "c.csv").write_text("image,caption\na.png,hello\nb.png,missing\n")
    assert _cli(["folder", "--images", str(tmp_path), "--captions", str(tmp_path / "c.csv"),
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "folder: 1 rows, 1 shards" in out
    assert "rejected missing_file: 1 (e.g. record 1 (b.png))" in out


def test_cli_wikipedia_default_src_and_bad_src(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default ../shared/data/wikipedia resolves from the repo root
    if WIKI.is_dir():
        assert shards_cli.resolve_src(shards_cli.DEFAULT_WIKIPEDIA).resolve() == WIKI.resolve()
    assert _cli(["wikipedia", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "raw_features.mat" in capsys.readouterr().err
