"""A real 2-worker DeepSpeed run under Ray Train on a local Ray cluster, fed by Ray Data from
synthetic shards with planted bad records; then a resume from its checkpoint during which a worker
fails: the workers restart from the resumed run's latest checkpoint, each run continuing at the
saved step."""


import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARD_ROWS, two_worker_run

from raycmr.artifacts import load_exported, read_state
from raycmr.config import load_config
from raycmr.configs.tiny import TINY_TOWERS
from raycmr.train.loop import STEP_PHASES

pytestmark = pytest.mark.ray

BATCH = 16
BAD_ROWS = 4  # corrupt image bytes, an empty caption, a null caption, a null image
GOOD = SHARD_ROWS["train"] - BAD_ROWS  # of 2 workers x 4 batches x 16 rows per epoch
FAIL_AT = 10  # rank 0 fails once in epoch 3 of the resumed run (steps 9-12)


@pytest.fixture(scope="module")
def train_split(synthetic_shards, tmp_path_factory):
    """The shared training split with its last BAD_ROWS records replaced by broken ones."""
    folder = tmp_path_factory.mktemp("train_with_bad_records")
    first, *rest = sorted((synthetic_shards / "train").glob("*.parquet"))
    table = pq.read_table(first)
    good = table.slice(0, 1).to_pylist()[0]
    bad = []
    for i, (image, caption) in enumerate([(b"not an image", "a red circle"),
                                          (good["image"], ""), (good["image"], None),
                                          (None, "a blue square")]):
        bad.append({**good, "id": f"bad-{i}", "image": image, "caption": caption})
    pq.write_table(pa.concat_tables([table.slice(0, table.num_rows - BAD_ROWS),
                                     pa.Table.from_pylist(bad, schema=table.schema)]),
                   folder / first.name)
    for path in rest:
        shutil.copy(path, folder / path.name)
    return folder


def _fit(shards, train, storage, name, *extra, **kwargs):
    from raycmr.train.trainer import build_trainer

    overrides = [*two_worker_run([train], shards, storage, name, BATCH),
                 "model.embed_dim=32", *TINY_TOWERS, "train.zero_stage=1", *extra]
    return build_trainer(load_config("quickstart", overrides), **kwargs).fit()


@pytest.fixture(scope="module")
def runs(ray_cluster, synthetic_shards, train_split, tmp_path_factory):
    """A 1-epoch run, then a run resumed from its checkpoint to epoch 3 in which rank 0 fails
    once at step FAIL_AT (Ray Train restarts the workers: max_failures=1). The resumed run keeps
    every checkpoint: its metrics_dataframe (the kept checkpoints' reports) is then its whole
    history."""
    storage = tmp_path_factory.mktemp("runs")
    first = _fit(synthetic_shards, train_split, storage, "first")
    assert first.error is None
    marker = storage / "failed-once"
    resumed = _fit(synthetic_shards, train_split, storage, "second", "train.epochs=3",
                   f"train.resume_from={first.checkpoint.path}", "train.max_failures=1",
                   "train.num_to_keep=0",
                   inject_failure={"step": FAIL_AT, "marker": str(marker)})
    return first, resumed, marker


def test_two_worker_deepspeed_run_then_resume(runs):
    first, resumed, _ = runs
    m = first.metrics
    assert m["epoch"] == 1 and m["step"] == 4  # 128 rows / (2 workers x 16) = 4 steps
    assert m["dropped_records"] == BAD_ROWS
    assert m["samples_seen"] == GOOD
    assert m["val_num_images"] == SHARD_ROWS["val"] and m["val_num_captions"] == SHARD_ROWS["val"]
    for key in ("train_loss", "train_contrastive", "train_hardest_neg_sim", "lr", "val_rsum",
                "val_t2i_r1", "val_i2t_medr"):
        assert key in m, key
    # the step profile accounts for the epoch: the first batch's wait plus 4 steps of the
    # phases' mean ms are the epoch's time (the workers' means against rank 0's clock)
    phases = [m[f"step_ms_{p}"] for p in STEP_PHASES]
    assert min(phases) >= 0 and m["step_ms_forward"] > 0 and m["step_ms_backward"] > 0
    accounted = m["first_batch_s"] + 4 * sum(phases) / 1000
    assert m["first_batch_s"] > 0 and 0.8 * m["epoch_time_s"] <= accounted <= 1.1 * m["epoch_time_s"]
    ckpt = first.checkpoint.path
    assert read_state(ckpt)["step"] == 4
    model, cfg = load_exported(ckpt)  # the exported model loads without DeepSpeed
    assert cfg.train.name == "first" and model.image_proj.out_features == 32

    assert resumed.error is None
    # the resumed run trained epochs 2 and 3 only, continuing at step 4 -> 8 -> 12, samples and
    # dropped records counted on
    assert sorted(resumed.metrics_dataframe["epoch"]) == [2, 3]
    assert resumed.metrics["step"] == 12
    assert resumed.metrics["samples_seen"] == 3 * GOOD
    assert resumed.metrics["dropped_records"] == 3 * BAD_ROWS


def test_worker_failure_recovers_from_latest_checkpoint(runs):
    """Rank 0 dies once at step 10 (epoch 3); the restarted workers resume from the run's own
    epoch-2 checkpoint (step 8), not from train.resume_from (epoch 1) nor from zero."""
    _, resumed, marker = runs
    assert resumed.error is None
    assert marker.read_text() == str(FAIL_AT)  # the failure did happen
    history = resumed.metrics_dataframe
    # each epoch reported once (Ray does not promise the rows in report order): epoch 2 was
    # not trained again after the failure (every report has its kept checkpoint here)
    assert sorted(history["epoch"]) == [2, 3]
    assert sorted(history["step"]) == [8, 12]
    assert resumed.metrics["samples_seen"] == 3 * GOOD
