"""Rendered hard negative images: the generator's groups and the batching that keeps them together."""

from __future__ import annotations

import dataclasses
import io
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data_synthetic import parse_caption

from raycmr.config import ConfigError, DataConfig, load_config
from raycmr.data.pipeline import build_dataset, count_groups, iter_worker_batches, pack_group
from raycmr.data.synthetic import (
    COLOURS,
    SWAP_KINDS,
    Group,
    generate,
    layout,
    write_synthetic_split,
)
from raycmr.data.transforms import stable_hash63

FIELDS = [f.name for f in dataclasses.fields(Group)]


def _by_group(records):
    groups = defaultdict(list)
    for rec in records:
        groups[rec.group].append(rec)
    return groups


def test_each_variant_swaps_exactly_its_binding_and_is_captioned_and_drawn_as_itself():
    plain = list(generate(60, seed=5))
    groups = _by_group(generate(60, seed=5, hard_images=True))
    assert list(groups) == [r.image_id for r in plain]
    kinds_seen = set()
    for source, (head, *variants) in zip(plain, groups.values()):
        # the source is the plain generator's record, byte for byte
        assert (head.image_id, head.image, head.captions, head.swap) == \
            (source.image_id, source.image, source.captions, "source")
        assert len(variants) <= len(SWAP_KINDS)
        assert len({v.swap for v in variants}) == len(variants)  # one variant per kind
        assert len({v.scene.key() for v in (head, *variants)}) == 1 + len(variants)
        if len(source.scene.groups) == 1:
            assert variants == []
        for var in variants:
            kinds_seen.add(var.swap)
            assert var.image_id == f"{source.image_id}-{var.swap}"
            changed = [i for i, (a, b) in enumerate(zip(source.scene.groups, var.scene.groups))
                       if a != b]
            assert len(changed) == 2, var
            i, j = changed
            a, b = source.scene.groups[i], source.scene.groups[j]
            va, vb = var.scene.groups[i], var.scene.groups[j]
            assert (getattr(va, var.swap), getattr(vb, var.swap)) == \
                (getattr(b, var.swap), getattr(a, var.swap))
            for name in FIELDS:
                if name != var.swap:
                    assert getattr(va, name) == getattr(a, name)
                    assert getattr(vb, name) == getattr(b, name)
            assert parse_caption(var.captions[0]) == var.scene.key()
            pixels = np.asarray(Image.open(io.BytesIO(var.image)).convert("RGB")).astype(int)
            for group in var.scene.groups:
                for x, y in layout(group, 64)[0]:
                    assert np.abs(pixels[int(y), int(x)] - COLOURS[group.colour]).max() <= 20
    assert kinds_seen == set(SWAP_KINDS)


def test_pack_group_pads_members_and_joins_drop_reasons():
    columns = {"pixel_values": np.arange(12, dtype=np.float32).reshape(2, 2, 3),
               "group": np.array([7, 9], dtype=np.int64),
               "domain": np.array(["plain", "plain"], dtype=object),
               "valid": np.array([True, False]),
               "drop_reason": np.array(["", "empty_caption"], dtype=object)}
    out = pack_group(columns, 3)
    assert out["member_valid"].tolist() == [[True, False, False]]
    assert out["valid"].tolist() == [True]
    assert out["drop_reason"].tolist() == ["empty_caption"]
    assert out["group"].tolist() == [[7, 9, 0]]
    assert out["pixel_values"].shape == (1, 3, 2, 3)
    assert out["pixel_values"][0, 1].tolist() == [[6, 7, 8], [9, 10, 11]]
    assert not out["pixel_values"][0, 2].any()
    assert out["domain"].tolist() == ["plain"]
    with pytest.raises(ValueError, match="data.group_size=1"):
        pack_group(columns, 1)


@pytest.mark.ray
def test_group_batches_hold_every_scene_with_all_its_variants(ray_cluster, tmp_path):
    out = tmp_path / "train"
    # 7 rows a shard: groups straddle shard files, and Ray Data's groupby brings them together
    write_synthetic_split(out, "train", 12, seed=2, image_size=32, rows_per_shard=7,
                          hard_images=True, progress=False)
    table = pq.read_table(out)
    scene_of = {stable_hash63(i): g for i, g in zip(table.column("image_id").to_pylist(),
                                                    table.column("group").to_pylist())}
    sizes = defaultdict(int)
    for g in table.column("group").to_pylist():
        sizes[g] += 1
    assert count_groups([str(out)], 4) == 12 and max(sizes.values()) > 1
    cfg = DataConfig(image_size=32, max_text_len=24, augment=False, group_size=4)
    ds = build_dataset([str(out)], cfg, training=True, seed=1)
    seen = defaultdict(list)
    n_batches = 0
    for batch, dropped in iter_worker_batches(ds, 3, shuffle_buffer=6, seed=0, drop_last=False):
        assert not dropped
        scenes = [scene_of[int(h)] for h in batch["group"]]
        assert len(batch["pixel_values"]) == len(scenes) == sum(sizes[s] for s in set(scenes))
        for s in set(scenes):
            seen[s].append(n_batches)
        n_batches += 1
    assert n_batches == 4
    assert {s: len(b) for s, b in seen.items()} == {s: 1 for s in sizes}  # one batch each


def test_group_size_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.group_size must be >= 0"):
        load_config("quickstart", ["data.group_size=-1"])
    plain, hard = tmp_path / "plain", tmp_path / "hard"
    write_synthetic_split(plain, "train", 4, seed=0, image_size=16, progress=False)
    write_synthetic_split(hard, "train", 20, seed=0, image_size=16, progress=False,
                          hard_images=True)
    with pytest.raises(ConfigError, match=r"^data.group_size=4 .* has no group column: .*"
                                          r"--hard-images"):
        count_groups([str(plain)], 4)
    with pytest.raises(ConfigError, match=r"^data.group_size is 2 but a training group has [34] rows: set data.group_size >= [34]$"):
        count_groups([str(hard)], 2)
