"""The phi(x) store next to an index (raycmr/index/phi_store.py) without a cluster: the block
writer a Ray Data actor runs, called here on hand-made batches, then the store read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycmr.artifacts import write_export
from raycmr.config import ConfigError, load_config
from raycmr.index.phi_store import (
    PhiBlockWriter,
    PhiStore,
    assemble,
    describe_size,
    finish_phi,
    has_phi,
)
from raycmr.models.slow import build_slow_model, stored_phi

IMAGE_SIZE, WIDTH = 32, 32
TOKENS = (IMAGE_SIZE // 8) ** 2


def slow_config():
    return load_config("quickstart_slow", [f"data.image_size={IMAGE_SIZE}",
                                           "data.max_text_len=16", f"slow.width={WIDTH}",
                                           "slow.heads=2", "slow.decoder_layers=1"])


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    cfg = slow_config()
    torch.manual_seed(0)
    model = build_slow_model(cfg.slow, torch.arange(1000, 1100), IMAGE_SIZE, 16).eval()
    ckpt = tmp_path_factory.mktemp("slow") / "ckpt"
    ckpt.mkdir()
    write_export(ckpt, model.state_dict(), cfg, {})
    return model, cfg, str(ckpt)


def _batch(groups: list[int], valid: list[bool], seed: int) -> dict[str, np.ndarray]:
    """A decoded batch as the pipeline yields it: one image per group (its captions' rows share
    the pixels), some rows invalid."""
    pixels = np.stack([np.random.default_rng(1000 + g).standard_normal(
        (3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) for g in groups])
    return {"pixel_values": pixels, "group": np.asarray(groups, np.int64),
            "valid": np.asarray(valid), "label": np.zeros(len(groups), np.int64)}


@pytest.mark.parametrize("uri", [False, True])
def test_round_trip_is_exact_in_fp16_and_rows_follow_the_index(slow, tmp_path, uri) -> None:
    model, cfg, ckpt = slow
    # index rows are not shard order: group g sits at row_of[g]; group 99 is not in the gallery
    row_of = {10: 3, 11: 0, 12: 4, 13: 1, 14: 2}
    out = f"file://{tmp_path / 'index'}" if uri else str(tmp_path / "index")
    encode = PhiBlockWriter(cfg.to_dict(), model.state_dict(), row_of, out)()
    batches = [_batch([11, 11, 10, 99, 12], [True, True, True, True, True], 0),
               _batch([12, 13, 13, 14, 14], [True, False, True, True, True], 1)]
    parts = [encode(b) for b in batches]
    assert [len(p["row"]) for p in parts] == [3, 3]  # 11, 10, 12 | 12, 13, 14: 99 skipped
    got = {k: np.concatenate([p[k] for p in parts]) for k in ("row", "block", "offset")}
    assert not has_phi(out)
    record = finish_phi(out, got, len(row_of), cfg, ckpt)
    assert has_phi(out)
    assert (record["count"], record["copies"], record["tokens"], record["width"]) == \
        (5, 6, TOKENS, WIDTH)  # image 12 straddles the two batches: stored twice

    store = PhiStore(out)
    assert store.shape == (5, TOKENS, WIDTH)
    for rows in ([0, 1, 2, 3, 4], [4, 0, 4]):
        got_phi = store.get(rows)
        assert got_phi.dtype == np.float16
        inverse = {r: g for g, r in row_of.items()}
        pixels = torch.from_numpy(np.concatenate(
            [_batch([inverse[r]], [True], 0)["pixel_values"] for r in rows]))
        with torch.no_grad():
            want = model.encode_image(pixels).half().numpy()
            assert np.array_equal(got_phi, want)  # bit-exact: fp16 in, fp16 out
            assert torch.equal(torch.from_numpy(got_phi).float(),
                               stored_phi(model.encode_image(pixels)))
    assert not np.array_equal(store.get([0]), store.get([1]))
    with pytest.raises(IndexError, match="outside 0..4"):
        store.get([5])

    # the size printed: every block file on disk, 2 bytes per fp16 value + .npy headers
    on_disk = sum(p.stat().st_size for p in (tmp_path / "index" / "phi").glob("block-*.npy"))
    assert record["bytes"] == on_disk
    assert 6 * TOKENS * WIDTH * 2 < on_disk < 6 * TOKENS * WIDTH * 2 + 2 * 256
    line = describe_size(record)
    assert line.startswith(f"5 images x {TOKENS} x {WIDTH} float16 = {on_disk / 1e3:.1f} KB")
    assert "1 repeated at batch edges" in line


def test_missing_rows_and_stores_are_named(slow, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no phi\(x\) was written for index rows \[1, 3\]"):
        assemble(np.array([0, 2]), np.array(["a.npy", "a.npy"], dtype=object),
                 np.array([0, 1]), 4)
    names, loc, copies = assemble(np.array([1, 0, 1]),
                                  np.array(["b.npy", "b.npy", "a.npy"], dtype=object),
                                  np.array([0, 1, 0]), 2)
    assert names == ["a.npy", "b.npy"] and copies == 3
    assert loc.tolist() == [[1, 1], [0, 0]]  # row 1's lowest (block, offset) copy
    with pytest.raises(ConfigError, match="has no phi store .*raycmr index --checkpoint FAST "
                                          "--slow SLOW"):
        PhiStore(tmp_path / "nothing")
