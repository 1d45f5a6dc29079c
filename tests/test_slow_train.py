"""The slow model as a task of the one training engine: a real 2-worker DeepSpeed run under
Ray Train on a local Ray cluster, its validation recomputed from the exported checkpoint, then
a resume from that checkpoint continuing at the saved step."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import two_worker_run

from raycmr.artifacts import load_slow_exported, read_state
from raycmr.config import load_config
from raycmr.configs.tiny import TINY_SLOW
from raycmr.data.text import load_text_encoder
from raycmr.data.transforms import preprocess_images
from raycmr.evaluate import slow as slow_eval
from raycmr.evaluate.metrics import group_pairs

pytestmark = pytest.mark.ray

BATCH = 16


def _overrides(shards, storage, name):
    return [*two_worker_run([shards / "train"], shards, storage, name, BATCH),
            *TINY_SLOW, "slow.bidirectional=true", "slow.val_queries=1000"]


def _run(overrides):
    from raycmr.train.slow.driver import build_slow_trainer

    return build_slow_trainer(load_config("quickstart_slow", overrides)).fit()


@torch.no_grad()
def _slow_only_from_export(ckpt, shards) -> dict[str, float]:
    """Slow-only text->image metrics of the val split by the exported model, in one process."""
    model, _ = load_slow_exported(ckpt)
    table = pq.read_table(next((shards / "val").glob("*.parquet")))
    data = preprocess_images(table, image_size=32, max_text_len=16,
                             encode=load_text_encoder("minilm"), augment=False, seed=0, epoch=0)
    image_rows, target = group_pairs(data["group"])
    split = slow_eval.RerankSplit(model.encode_image(torch.from_numpy(data["pixel_values"][image_rows])),
                           torch.from_numpy(data["input_ids"]),
                           torch.from_numpy(data["attention_mask"]), target)
    return slow_eval.summary(slow_eval.slow_only_ranks(model, split), "t2i")


def test_two_worker_slow_run_validates_and_resumes(ray_cluster, synthetic_shards, tmp_path):
    shards = synthetic_shards
    storage = tmp_path / "runs"
    first = _run(_overrides(shards, storage, "first"))
    assert first.error is None
    m = first.metrics
    assert m["epoch"] == 1 and m["step"] == 4  # 128 rows / (2 workers x 16) = 4 steps
    assert m["samples_seen"] == 128
    assert np.isfinite(m["train_loss"]) and m["train_nll_per_token"] > 0
    ckpt = first.checkpoint.path
    assert read_state(ckpt)["step"] == 4
    # the validation metric (sharded phi(x) over 2 workers, scored on rank 0) is what the
    # exported model gives on the whole split in one process
    expected = _slow_only_from_export(ckpt, shards)
    for key, value in expected.items():
        assert m[f"val_{key}"] == pytest.approx(value), key

    resumed = _run(_overrides(shards, storage, "second")
                   + ["train.epochs=2", f"train.resume_from={ckpt}"])
    assert resumed.error is None
    history = resumed.metrics_dataframe
    assert list(history["epoch"]) == [2]
    assert list(history["step"]) == [8]
    assert resumed.metrics["samples_seen"] == 256
    # training went on from the checkpoint's weights: the loss keeps falling
    assert resumed.metrics["train_loss"] < m["train_loss"]


def test_fast_checkpoint_is_resolved_for_the_workers(tmp_path, monkeypatch):
    """A relative run dir given as slow.fast_checkpoint becomes the absolute newest checkpoint
    (workers run in their own directory)."""
    from raycmr.artifacts import write_export
    from raycmr.config import ConfigError
    from raycmr.models.dual_encoder import DualEncoder
    from raycmr.train.slow.driver import resolve_fast_checkpoint

    fast_cfg = load_config("wikipedia", ["model.image.input_dim=6", "model.text.input_dim=5",
                                         "model.embed_dim=4"])
    ckpt = tmp_path / "runs" / "r1" / "checkpoint_000003"
    write_export(ckpt, DualEncoder(fast_cfg.model).state_dict(), fast_cfg, {})
    monkeypatch.chdir(tmp_path)
    cfg = load_config("quickstart_slow", ["slow.fast_checkpoint=runs/r1"])
    assert resolve_fast_checkpoint(cfg).slow.fast_checkpoint == str(ckpt)
    assert resolve_fast_checkpoint(load_config("quickstart_slow")).slow.fast_checkpoint == ""
    with pytest.raises(ConfigError, match="no raycmr checkpoint at 'nope'"):
        resolve_fast_checkpoint(load_config("quickstart_slow", ["slow.fast_checkpoint=nope"]))
