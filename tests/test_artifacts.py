"""raycmr.artifacts: checkpoint exports and index folders round-trip through local paths and
URIs (``file://``, read through pyarrow.fs as object stores are)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from raycmr import artifacts
from raycmr.config import ConfigError, load_config
from raycmr.index.faiss_index import build_index, load_index, save_index, search
from raycmr.models.dual_encoder import DualEncoder


def _features_config():
    return load_config("wikipedia", ["model.image.input_dim=6", "model.text.input_dim=5",
                                     "model.embed_dim=4"])


def test_export_round_trip_through_a_uri_and_a_run_dir(tmp_path) -> None:
    cfg = _features_config()
    torch.manual_seed(0)
    model = DualEncoder(cfg.model, temperature=cfg.loss.temperature).eval()
    run = tmp_path / "run"
    for i, name in enumerate(("checkpoint_000000", "checkpoint_000001")):
        artifacts.write_export(f"file://{run / name}", model.state_dict(), cfg, {"epoch": i})
        stamp = time.time() - 100 + 10 * i  # the second one is the newest
        os.utime(run / name, (stamp, stamp))
    assert artifacts.find_checkpoint(run) == str(run / "checkpoint_000001")
    assert artifacts.read_state(artifacts.find_checkpoint(run)) == {"epoch": 1}
    loaded, loaded_cfg = artifacts.load_exported(f"file://{run}")
    assert loaded_cfg == cfg
    batch = {"image_feat": torch.randn(3, 6), "text_feat": torch.randn(3, 5)}
    with torch.no_grad():
        for a, b in zip(model(batch), loaded(batch)):
            assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="no raycmr checkpoint at"):
        artifacts.find_checkpoint(tmp_path / "nothing")


def test_index_folder_round_trip_through_a_uri(tmp_path) -> None:
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((50, 8)).astype(np.float32)
    index = build_index(gallery, "hnsw", ef_search=20)
    uri = f"file://{tmp_path / 'idx'}"
    save_index(index, [f"id{i}" for i in range(50)], uri)
    artifacts.write_gallery(uri, {"count": 50})
    loaded, ids = load_index(uri)
    assert ids == [f"id{i}" for i in range(50)] and loaded.hnsw.efSearch == 20
    np.testing.assert_array_equal(search(loaded, gallery[:5], 3)[1], search(index, gallery[:5], 3)[1])
    assert artifacts.read_gallery(uri) == {"count": 50}
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(artifacts.INDEX_FILES)


class _Payload:
    """Unpickling this runs code (writes a file): what a hostile checkpoint would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_are_loaded_as_weights_only(tmp_path, monkeypatch) -> None:
    """A model.pt holding anything but tensors and plain containers is refused before any of
    its code runs: torch.load(weights_only=True) explicitly, so not even torch's switch back to
    full unpickling (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) or an older default changes it."""
    import pickle

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    cfg = _features_config()
    model = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
    artifacts.write_export(tmp_path / "ckpt", model.state_dict(), cfg, {"epoch": 0})
    marker = tmp_path / "ran"
    torch.save({**model.state_dict(), "x": _Payload(str(marker))},
               tmp_path / "ckpt" / artifacts.MODEL_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        artifacts.load_exported(tmp_path / "ckpt")
    assert not marker.exists()
