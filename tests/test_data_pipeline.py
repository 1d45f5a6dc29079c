"""The Ray Data pipeline on a real local Ray cluster: shapes, groups, exact drop counts,
WebDataset round trip, feature shards, driver-side errors."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import WIKIPEDIA as WIKI
from conftest import needs_wikipedia

from raycmr.config import DataConfig
from raycmr.data.pipeline import TokenizerError, build_dataset, iter_worker_batches, load_tokenizer
from raycmr.data.schema import ShardSchemaError, image_shard_schema
from raycmr.data.synthetic import generate
from raycmr.data.transforms import stable_hash63

N_ROWS = 40


@pytest.fixture(scope="module")
def planted_shards(tmp_path_factory):
    """Two shards, N_ROWS rows of synthetic images, pairs of captions share an image_id; rows
    5, 17 and 30 are bad (null image, corrupt bytes, empty caption)."""
    out = tmp_path_factory.mktemp("planted")
    records = list(generate(N_ROWS // 2, seed=7, captions_per_image=2))
    rows = []
    for rec in records:
        for j, cap in enumerate(rec.captions):
            rows.append({"id": f"{rec.image_id}-{j}", "image": rec.image, "caption": cap,
                         "image_id": rec.image_id, "label": rec.scene.label, "domain": "syn"})
    rows[5]["image"] = None
    rows[17]["image"] = b"\xff\xd8\xff\xe0 corrupt"
    rows[30]["caption"] = ""
    schema = image_shard_schema()
    for k, part in enumerate((rows[:25], rows[25:])):
        table = pa.table({c: [r[c] for r in part] for c in schema.names}, schema=schema)
        pq.write_table(table, out / f"part-{k}.parquet")
    return out, rows


@pytest.mark.ray
def test_planted_bad_rows_are_dropped_and_counted_exactly(ray_cluster, planted_shards):
    out, rows = planted_shards
    cfg = DataConfig(image_size=32, max_text_len=16, augment=True)
    ds = build_dataset([str(out)], cfg, training=True, seed=3)
    seen, dropped, sizes = Counter(), Counter(), []
    for batch, drops in iter_worker_batches(ds, 8, shuffle_buffer=16, seed=0, drop_last=False):
        assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "group", "label"}
        pv = batch["pixel_values"]
        assert pv.dtype.is_floating_point and tuple(pv.shape[1:]) == (3, 32, 32)
        assert float(pv.min()) >= -1.0 and float(pv.max()) <= 1.0
        assert str(batch["input_ids"].dtype) == "torch.int64"
        assert tuple(batch["input_ids"].shape[1:]) == (16,)
        assert bool((batch["attention_mask"].sum(1) > 2).all())
        sizes.append(len(pv))
        seen.update(batch["group"].tolist())
        dropped.update(drops)
    assert sum(sizes) == N_ROWS - 3 and 0 not in sizes
    assert dropped == {"null_image": 1, "undecodable_image": 1, "empty_caption": 1}
    good = [r for i, r in enumerate(rows) if i not in (5, 17, 30)]
    assert seen == Counter(stable_hash63(r["image_id"]) for r in good)
    assert sum(c == 2 for c in seen.values()) == N_ROWS // 2 - 3  # captions sharing an image


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.ray
def test_webdataset_tar_round_trip(ray_cluster, tmp_path):
    records = list(generate(6, seed=11, image_format="jpeg"))
    samples = []
    for i, rec in enumerate(records):
        sample = {f"{i:06d}.jpg": rec.image, f"{i:06d}.txt": rec.captions[0].encode()}
        if i % 2 == 0:
            sample[f"{i:06d}.json"] = json.dumps(
                {"image_id": "shared", "label": rec.scene.label}).encode()
        samples.append(sample)
    samples.append({"000006.jpg": records[0].image})  # no caption -> counted, not fatal
    _tar(tmp_path / "shard-000.tar", samples)
    cfg = DataConfig(image_size=24, max_text_len=32)
    ds = build_dataset([str(tmp_path / "*.tar")], cfg, training=False)
    tok = load_tokenizer("minilm")
    got, labels, groups, dropped = {}, {}, {}, Counter()
    for batch, drops in iter_worker_batches(ds, 4, shuffle_buffer=0, seed=0, drop_last=False):
        dropped.update(drops)
        assert tuple(batch["pixel_values"].shape[1:]) == (3, 24, 24)
        for ids, label, group in zip(batch["input_ids"].numpy(), batch["label"].tolist(),
                                     batch["group"].tolist()):
            text = tok.decode(ids, skip_special_tokens=True)
            got[text], labels[text], groups[text] = True, label, group
    captions = [r.captions[0] for r in records]
    assert sorted(got) == sorted(captions)
    assert dropped == {"empty_caption": 1}
    for i, cap in enumerate(captions):
        assert labels[cap] == (records[i].scene.label if i % 2 == 0 else -1)
        assert groups[cap] == stable_hash63("shared" if i % 2 == 0 else f"{i:06d}")


@pytest.mark.ray
@needs_wikipedia
def test_feature_shards_pipeline(ray_cluster, tmp_path):
    from raycmr.data.writers import write_wikipedia_shards

    write_wikipedia_shards(WIKI, tmp_path, rows_per_shard=400)
    table = pq.read_table(tmp_path / "test" / "part-00000.parquet")  # rows 0..399
    assert table.num_rows == 400
    feats = table.column("image_feat").to_pylist()
    feats[3] = None
    feats[10][0] = float("nan")
    pq.write_table(table.set_column(1, "image_feat", pa.array(feats, pa.list_(pa.float32()))),
                   tmp_path / "test" / "part-00000.parquet")
    (tmp_path / "test" / "part-00001.parquet").unlink()
    cfg = DataConfig(kind="features")
    ds = build_dataset([str(tmp_path / "test")], cfg, training=True, seed=0)
    by_group, dropped = {}, Counter()
    for batch, drops in iter_worker_batches(ds, 64, shuffle_buffer=128, seed=1, drop_last=False):
        assert set(batch) == {"image_feat", "text_feat", "group", "label"}
        assert tuple(batch["image_feat"].shape[1:]) == (128,)
        assert tuple(batch["text_feat"].shape[1:]) == (10,)
        dropped.update(drops)
        for g, f in zip(batch["group"].tolist(), batch["image_feat"].numpy()):
            by_group[g] = f
    assert dropped == {"null_feature": 1, "nan_feature": 1}
    assert len(by_group) == 400 - 2
    image_ids = table.column("image_id").to_pylist()
    for row in (0, 1, 399):
        np.testing.assert_array_equal(by_group[stable_hash63(image_ids[row])], feats[row])


def test_driver_side_errors_before_any_ray_work(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "p.parquet")
    with pytest.raises(ShardSchemaError, match="missing column.*'caption'"):
        build_dataset([str(tmp_path)], DataConfig(), training=True)
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"], "caption": ["c"]}),
                   tmp_path / "p.parquet")
    with pytest.raises(TokenizerError, match="/nowhere/tok"):
        build_dataset([str(tmp_path)], DataConfig(tokenizer="/nowhere/tok"), training=False)


@pytest.mark.ray
@pytest.mark.parametrize("reader, first_ops", [("v1", ["ReadParquet"]),
                                               ("v2", ["ListFiles", "ReadFilesParquetV2"])])
def test_parquet_reader_picks_the_read_path_and_restores_the_context(
        ray_cluster, planted_shards, reader, first_ops):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    out, _ = planted_shards
    ds = build_dataset([str(out)], DataConfig(image_size=32, max_text_len=16,
                                              parquet_reader=reader), training=True, seed=1)
    ops = [op.name for op in ds._logical_plan.dag.post_order_iter()]
    assert ops[:len(first_ops)] == first_ops
    assert ctx.use_datasource_v2 == before
    rows = sum(b["valid"].sum() for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert rows == N_ROWS - 3  # the same valid rows either way
