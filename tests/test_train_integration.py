"""A real 2-worker DeepSpeed run under Ray Train on a local Ray cluster, fed by Ray Data from
synthetic shards with planted bad records; then resume from its checkpoint, and recovery from a
worker failure, each continuing at the saved step."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycmr.artifacts import load_exported, read_state
from raycmr.config import load_config
from raycmr.configs.tiny import TINY_TOWERS
from raycmr.data.synthetic import write_synthetic_splits
from raycmr.train.loop import STEP_PHASES

pytestmark = pytest.mark.ray

BATCH = 16
BAD_ROWS = 4  # corrupt image bytes, an empty caption, a null caption, a null image


def _tiny_overrides(shards, storage, name):
    return [
        f"data.train=[{shards}/train]", f"data.val=[{shards}/val]", f"data.test=[{shards}/test]",
        "data.image_size=32", "data.max_text_len=16", "data.shuffle_buffer=32",
        "model.embed_dim=32",
        *TINY_TOWERS,
        "train.num_workers=2", f"train.batch_size={BATCH}", "train.epochs=1",
        "train.warmup_steps=2", "train.log_every=2", "train.zero_stage=1", "train.max_failures=0",
        f"train.storage_path={storage}", f"train.name={name}", "train.torch_threads=1",
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    # 2 workers x 4 batches x 16 rows = 128 rows per epoch, BAD_ROWS of them bad
    write_synthetic_splits(root, n_train=128 - BAD_ROWS, n_val=48, n_test=48, seed=3,
                           image_size=32, rows_per_shard=64)
    first = min((root / "train").glob("*.parquet"))
    table = pq.read_table(first)
    good = table.slice(0, 1).to_pylist()[0]
    bad = []
    for i, (image, caption) in enumerate([(b"not an image", "a red circle"),
                                          (good["image"], ""), (good["image"], None),
                                          (None, "a blue square")]):
        bad.append({**good, "id": f"bad-{i}", "image": image, "caption": caption})
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)]),
                   first)
    return root


def _run(overrides, **kwargs):
    from raycmr.train.trainer import build_trainer

    return build_trainer(load_config("quickstart", overrides), **kwargs).fit()


def test_two_worker_deepspeed_run_then_resume(ray_cluster, shards, tmp_path):
    storage = tmp_path / "runs"
    first = _run(_tiny_overrides(shards, storage, "first"))
    assert first.error is None
    m = first.metrics
    assert m["epoch"] == 1 and m["step"] == 4  # 128 rows / (2 workers x 16) = 4 steps
    assert m["dropped_records"] == BAD_ROWS
    assert m["samples_seen"] == 128 - BAD_ROWS
    assert m["val_num_images"] == 48 and m["val_num_captions"] == 48
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

    resumed = _run(_tiny_overrides(shards, storage, "second")
                   + ["train.epochs=2", f"train.resume_from={ckpt}"])
    assert resumed.error is None
    history = resumed.metrics_dataframe
    # the resumed run trained epoch 2 only, continuing at step 4 -> 8, samples counted on
    assert list(history["epoch"]) == [2]
    assert list(history["step"]) == [8]
    assert resumed.metrics["samples_seen"] == 2 * (128 - BAD_ROWS)
    assert resumed.metrics["dropped_records"] == 2 * BAD_ROWS


def test_worker_failure_recovers_from_latest_checkpoint(ray_cluster, shards, tmp_path):
    """Rank 0 dies once at step 6 (epoch 2); Ray Train restarts the workers, which resume from
    the epoch-1 checkpoint (step 4), not from zero."""
    marker = tmp_path / "failed-once"
    result = _run(_tiny_overrides(shards, tmp_path / "runs", "faulty")
                  + ["train.epochs=2", "train.max_failures=1"],
                  inject_failure={"step": 6, "marker": str(marker)})
    assert result.error is None
    assert marker.read_text() == "6"  # the failure did happen
    history = result.metrics_dataframe
    # each epoch reported once (Ray does not promise the rows in report order)
    assert sorted(history["epoch"]) == [1, 2]
    assert sorted(history["step"]) == [4, 8]
    assert result.metrics["samples_seen"] == 2 * (128 - BAD_ROWS)
