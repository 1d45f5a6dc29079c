"""Checks made before any Ray work: resources, paths that must survive the trip to a cluster,
bad settings and bad shards, each stopping with one line that names the problem and the fix."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from raycmr.cli import main
from raycmr.config import ConfigError, load_config
from raycmr.configs.tiny import HF_TOWERS
from raycmr.resources import (
    ClusterTooSmall,
    Demand,
    NodeType,
    check_cluster_fits,
    missing_resources,
)


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- resource arithmetic


def test_two_workers_and_ray_data_do_not_fit_a_two_cpu_head():
    # the hang of issue 10: 2 workers x 1 CPU + 2 CPUs for Ray Data on a default 2-CPU head
    demand = Demand(bundles=[{"CPU": 1.0}] * 2, free_cpus=2.0)
    assert missing_resources(demand, [{"CPU": 2.0}]) == "4 CPU in total (the cluster has 2)"
    assert missing_resources(demand, [{"CPU": 4.0}]) is None


def test_each_worker_must_fit_on_one_node():
    demand = Demand(bundles=[{"CPU": 2.0, "GPU": 1.0}] * 2, labels=["worker 0", "worker 1"])
    # 4 CPUs and 2 GPUs in total, but no node holds 2 CPUs beside its GPU
    nodes = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0}]
    assert missing_resources(demand, nodes) == (
        "{CPU: 2, GPU: 1} on a single node for worker 0 (at most {CPU: 1, GPU: 1} left on any node)")
    assert missing_resources(demand, [{"CPU": 2.0, "GPU": 1.0}] * 2) is None


def test_free_cpus_are_counted_after_placing_the_workers():
    demand = Demand(bundles=[{"CPU": 2.0, "raycmr_worker": 1.0}] * 2, free_cpus=1.0)
    nodes = [{"CPU": 2.0, "raycmr_worker": 1.0}, {"CPU": 2.0, "raycmr_worker": 1.0},
             {"CPU": 0.5}]
    # 4.5 CPUs >= 5 needed? no: the totals already fall short by 0.5
    assert missing_resources(demand, nodes) == "5 CPU in total (the cluster has 4.5)"
    nodes[2]["CPU"] = 1.0
    assert missing_resources(demand, nodes) is None
    # CPUs only on the worker nodes: placed workers leave none free there
    nodes = [{"CPU": 2.5, "raycmr_worker": 1.0}, {"CPU": 2.5, "raycmr_worker": 1.0}]
    assert missing_resources(demand, nodes) is None
    nodes = [{"CPU": 3.0, "raycmr_worker": 2.0}, {"CPU": 2.0}]
    assert missing_resources(demand, nodes) == (
        "{CPU: 2, raycmr_worker: 1} on a single node for one actor "
        "(at most {CPU: 1, raycmr_worker: 1} left on any node)")


def test_autoscaler_node_types_must_each_hold_a_worker():
    """Issue 24's hang: {CPU: 16, GPU: 1} workers and 8-CPU / 1-GPU node types. The totals of
    the autoscaler's maximum (8 nodes: 64 CPUs, 8 GPUs) would pass; no node can hold a worker."""
    demand = Demand(bundles=[{"CPU": 16.0, "GPU": 1.0}] * 2, labels=["worker 0", "worker 1"])
    head = [{"CPU": 2.0}]
    gpu8 = [NodeType({"CPU": 8.0, "GPU": 1.0}, 8, "gpu")]
    assert missing_resources(demand, head, gpu8) == (
        "{CPU: 16, GPU: 1} on a single node for worker 0 (no node type of the autoscaler holds "
        "it; the closest has {CPU: 8, GPU: 1})")
    gpu16 = [NodeType({"CPU": 16.0, "GPU": 1.0}, 1, "gpu16"), *gpu8]
    assert missing_resources(demand, head, gpu16) == (
        "{CPU: 16, GPU: 1} on a single node for worker 1 (the autoscaler's node types that hold "
        "it are all at their max_count)")
    gpu16[0].max_count = 2
    assert missing_resources(demand, head, gpu16) is None
    gpu16[0].max_count = -1  # no limit
    assert missing_resources(demand, head, gpu16) is None


def test_autoscaler_counts_running_nodes_against_max_count_and_keeps_free_cpus():
    cpu4 = [NodeType({"CPU": 4.0}, 3, "cpu4")]
    demand = Demand(bundles=[{"CPU": 4.0}] * 3, free_cpus=2.0)
    # two cpu4 nodes already run (one of them busy): one more may come; 4 + 4 + 2 on the head
    nodes, busy = [{"CPU": 2.0}, {"CPU": 4.0}, {"CPU": 4.0}], [{}, {"CPU": 4.0}, {}]
    assert missing_resources(demand, nodes, cpu4, busy) == (
        "{CPU: 4} on a single node for one actor (the autoscaler's node types that hold it are "
        "all at their max_count)")
    assert missing_resources(Demand(bundles=[{"CPU": 4.0}] * 2, free_cpus=2.0), nodes, cpu4,
                             busy) is None
    assert missing_resources(Demand(bundles=[{"CPU": 4.0}] * 2, free_cpus=2.5), nodes, cpu4,
                             busy) == "2.5 free CPU beside the actors (only 2 left)"


def test_capacity_in_use_is_not_free():
    demand = Demand(bundles=[{"CPU": 1.0}] * 2, free_cpus=2.0)
    assert missing_resources(demand, [{"CPU": 8.0}], in_use=[{"CPU": 4.0}]) is None
    assert missing_resources(demand, [{"CPU": 8.0}], in_use=[{"CPU": 4.5}]) == (
        "4 CPU in total (the cluster has 8, 4.5 of them in use)")


def _serve_plan(replicas: int, reranker: bool, images: bool, use_gpu: bool = False):
    from raycmr.config import ServeConfig
    from raycmr.serve.plan import ServePlan

    return ServePlan(serve=ServeConfig(replicas=replicas, max_replicas=replicas, use_gpu=use_gpu),
                     checkpoint="c", slow_checkpoint="s" if reranker else "", query_input="text",
                     text_dim=0, tokenizer="minilm", max_text_len=8, image_size=32, count=10,
                     index_kind="flat", data_kind="images" if images else "features")


def test_serving_needs_every_replica_of_every_deployment():
    from raycmr.serve.app import serving_demand

    full = serving_demand(_serve_plan(2, reranker=True, images=True))
    # 2 x (encoder, retriever, reranker, gallery: 1 CPU each; ingress 0.1 CPU) = 8.2 CPUs
    assert sorted(full.labels) == sorted(["QueryEncoder", "Retriever", "SlowScorer", "Gallery",
                                          "Ingress"] * 2)
    assert missing_resources(full, [{"CPU": 8.0}]) == "8.2 CPU in total (the cluster has 8)"
    assert missing_resources(full, [{"CPU": 9.0}]) is None
    lean = serving_demand(_serve_plan(1, reranker=False, images=False))
    assert missing_resources(lean, [{"CPU": 2.1}]) is None  # encoder + retriever + ingress
    gpu = serving_demand(_serve_plan(1, reranker=True, images=False, use_gpu=True))
    assert missing_resources(gpu, [{"CPU": 8.0, "GPU": 1.0}]) == (
        "2 GPU in total (the cluster has 1)")


def test_the_connected_cluster_is_checked(ray_cluster):
    # the session cluster: 8 CPUs, no GPU
    check_cluster_fits(Demand(bundles=[{"CPU": 1.0}] * 2, free_cpus=6.0))
    with pytest.raises(ClusterTooSmall) as exc:
        check_cluster_fits(Demand(bundles=[{"CPU": 1.0, "GPU": 1.0}] * 2, what="training",
                                  settings="train.use_gpu"))
    assert str(exc.value) == (
        "the Ray cluster is too small for training: it needs 2 GPU in total (the cluster has 0); "
        "change train.use_gpu, or add nodes (ray start --address ...)")


def test_train_stops_in_one_line_when_the_cluster_cannot_fit_it(ray_cluster, tmp_path, capsys):
    code = main(["train", "--config", "quickstart", "train.num_workers=7",
                 f"train.storage_path={tmp_path}/runs"])
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        "raycmr: error: the Ray cluster is too small for training (7 workers x {CPU: 1} + 2 CPU "
        "for Ray Data): it needs 9 CPU in total (the cluster has 8); change train.num_workers, "
        "train.cpus_per_worker, train.use_gpu, train.worker_resources, data.reserved_cpus, or "
        "add nodes (ray start --address ...)")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ paths on a cluster


def test_relative_storage_is_refused_when_joining_a_cluster(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached: refused before Ray starts
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "quickstart"]) == 2
    assert _error_lines(capsys) == [
        ("raycmr: error: train.storage_path='out/quickstart/runs' is relative: on a Ray cluster it "
        "would land in the job's temporary working-dir copy; set train.storage_path to an "
        "absolute path on storage every node shares (e.g. train.storage_path=/mnt/shared/runs) "
        "or a URI (train.storage_path=s3://bucket/runs)")]
    assert list(tmp_path.iterdir()) == []
    assert main(["tune", "--config", "quickstart", f"train.storage_path={tmp_path}/runs"]) == 2
    assert _error_lines(capsys)[0].startswith(
        "raycmr: error: tune.storage_path='runs/tune' is relative: on a Ray cluster")


# ---------------------------------------------------------------------------- settings and shards


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_non_positive_epochs_are_refused_at_validation(epochs):
    with pytest.raises(ConfigError) as exc:
        load_config("quickstart", [f"train.epochs={epochs}"])
    assert str(exc.value) == f"config key 'train.epochs' must be positive, got {epochs}"


def _train_args(root, split_dir, tmp_path):
    return ["train", "--config", "quickstart", f"data.train=[{split_dir}]",
            f"data.val=[{root}/val]", f"train.storage_path={tmp_path}/runs", "train.batch_size=8"]


def test_truncated_shard_is_named_in_one_line(ray_cluster, synthetic_shards, tmp_path, capsys):
    split = tmp_path / "train"
    split.mkdir()
    files = sorted((synthetic_shards / "train").glob("*.parquet"))
    assert len(files) == 2
    for f in files:
        (split / f.name).write_bytes(f.read_bytes())
    bad = split / files[1].name
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a copy cut short
    assert main(_train_args(synthetic_shards, split, tmp_path)) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"raycmr: error: shard file '{bad}' ")
    assert "truncated" in line and "rewrite it (raycmr shards ...) or remove it" in line
    assert not (tmp_path / "runs").exists()


def test_shard_missing_a_column_is_named_in_one_line(ray_cluster, synthetic_shards, tmp_path, capsys):
    split = tmp_path / "train"
    split.mkdir()
    files = sorted((synthetic_shards / "train").glob("*.parquet"))
    pq.write_table(pq.read_table(files[0]), split / files[0].name)
    # the second file, not the first, lacks the captions
    pq.write_table(pq.read_table(files[1]).drop_columns(["caption"]), split / files[1].name)
    assert main(_train_args(synthetic_shards, split, tmp_path)) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(
        f"raycmr: error: shard '{split / files[1].name}' is missing column(s) 'caption' needed "
        "for data.kind=images")
    assert line.endswith("write shards with `raycmr shards synthetic|folder` or rename the "
                         "columns to id, image, caption")


# ------------------------------------------------------------------ a worker killed at a checkpoint


def test_checkpoint_of_a_worker_killed_at_registration_is_removed(ray_cluster, synthetic_shards,
                                                                   tmp_path):
    """Rank 1 dies (os._exit) right after reporting epoch 1's checkpoint, before the controller
    collects its report: the folder is complete on disk but never registered, so num_to_keep
    would never delete it. Paths are file:// URIs, as a remote store's would be."""
    from raycmr.artifacts import find_checkpoint, read_state
    from raycmr.train.orphans import remove_unregistered_checkpoints
    from raycmr.train.trainer import build_trainer

    cfg = load_config("quickstart", [
        f"data.train=[file://{synthetic_shards}/train]", f"data.val=[file://{synthetic_shards}/val]",
        "data.image_size=16", "data.max_text_len=8", "model.embed_dim=16",
        *HF_TOWERS,
        ("model.image.hf_config={model_type: vit, image_size: 16, patch_size: 8, hidden_size: 16,"
         " num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}"),
        ("model.text.hf_config={model_type: bert, vocab_size: 30522, hidden_size: 16,"
         " num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32,"
         " max_position_embeddings: 16}"),
        "train.batch_size=32", "train.epochs=2", "train.num_to_keep=1", "train.max_failures=1",
        "train.warmup_steps=1", "train.torch_threads=1", "train.zero_stage=0",
        f"train.storage_path=file://{tmp_path}/runs", "train.name=killed",
    ])
    marker = tmp_path / "killed-at"
    # 128 rows / (2 workers x 32) = 2 steps per epoch: step 2 ends epoch 1
    result = build_trainer(cfg, inject_failure={"step": 2, "rank": 1, "after_checkpoint": True,
                                                "marker": str(marker)}).fit()
    assert marker.read_text() == "2"
    run = tmp_path / "runs" / "killed"
    registered = {c.path for c, _ in result.best_checkpoints} | {result.checkpoint.path}
    on_disk = {str(p) for p in run.glob("checkpoint_*") if p.is_dir()}
    orphans = on_disk - registered
    assert len(orphans) == 1, (sorted(on_disk), sorted(registered),
                               {p: read_state(p) for p in on_disk})
    (orphan,) = orphans
    # complete, and from the killed attempt: epoch 1 (the restart began from scratch)
    assert read_state(orphan)["epoch"] == 1 and (run / orphan / "model.pt").exists()
    assert read_state(result.checkpoint.path)["epoch"] == 2
    assert read_state(result.checkpoint.path)["step"] == 4

    assert remove_unregistered_checkpoints(result) == [orphan]
    assert {str(p) for p in run.glob("checkpoint_*") if p.is_dir()} == registered
    # a run dir given as a URI resolves to its newest registered checkpoint
    assert find_checkpoint(f"file://{run}").removeprefix("file://") == result.checkpoint.path
