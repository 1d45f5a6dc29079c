"""raycmr on a real cluster started with `ray start`: the 3-node cluster of
cluster/local_multinode.sh, shared by every test here. Checks made before training (a relative
storage path in the documented command, a cluster too small), then the quickstart submitted with
the real `ray job submit` CLI (through jobs/submit_quickstart.sh, as documented), its 2 training
workers on different nodes, one of which is killed mid-run: the run resumes on the nodes left and
ends in the shared path.

The cluster has its own --temp-dir and port block, never the test session's local cluster nor
one of another user, and is stopped (by temp dir) even when a test fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycmr.configs.tiny import HF_TOWERS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_multinode.sh"
SUBMIT = ROOT / "jobs" / "submit_quickstart.sh"
RAY = str(Path(sys.executable).parent / "ray")

# a tiny run: 64 training rows, 2 workers x 16 = 2 steps per epoch, 16x16 images, 1-layer towers
TINY = [
    "data.image_size=16", "data.max_text_len=8", "data.shuffle_buffer=0", "model.embed_dim=16",
    *HF_TOWERS,
    ("model.image.hf_config={model_type: vit, image_size: 16, patch_size: 8, hidden_size: 16,"
     " num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}"),
    ("model.text.hf_config={model_type: bert, vocab_size: 30522, hidden_size: 16,"
     " num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32,"
     " max_position_embeddings: 16}"),
    "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1", "train.zero_stage=0",
    "train.torch_threads=1",
]
TRAIN_ROWS, EVAL_ROWS = 64, 16
# Ray Train's controller takes one report (one epoch) per poll: with a poll every POLL_S, the run
# lasts at least (EPOCHS - 2) x POLL_S after its first checkpoint, time enough to kill a node
POLL_S, EPOCHS = 1.0, 15


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's servers bind
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _port_block(size: int) -> int:
    """A base port in 22000-32999 (outside Ray's default worker ports and the Linux ephemeral
    range) whose first ports and range ends are free now."""
    bases = list(range(22000, 33000 - size, 100))
    random.shuffle(bases)
    for base in bases:
        probes = [base + i for i in range(0, size, 1000)] + [base + size - 1]
        if all(_free(p) and _free(p + 1) and _free(p + 5) for p in probes):
            return base
    pytest.skip("no free port block for a test Ray cluster")


def _client_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv on PATH, this tree importable, no
    RAY_ADDRESS; token auth as Ray's own default (on when ~/.ray/auth_token exists)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if "RAY_AUTH_MODE" not in env and (Path.home() / ".ray" / "auth_token").is_file():
        env["RAY_AUTH_MODE"] = "token"
    env.update(extra)
    return env


def _stop(root: Path) -> None:
    """Stop every process of the cluster under ``root`` (nodes n0, n1, ...), by temp dir."""
    subprocess.run(["bash", str(SCRIPT), "down"], check=False, env=_client_env(RAYCMR_LOCAL_DIR=str(root)),
                   capture_output=True, timeout=120)


def _states(run: Path) -> dict[str, dict]:
    out = {}
    for ckpt in run.glob("checkpoint_*"):
        try:
            out[ckpt.name] = json.loads((ckpt / "state.json").read_text())
        except (OSError, ValueError):
            pass  # not written completely yet
    return out


# ------------------------------------------------------------------------- the test cluster


@pytest.fixture(scope="module")
def three_nodes():
    """cluster/local_multinode.sh up: a head and 2 worker nodes (2 CPUs and one `raycmr_worker`
    slot each, 6 CPUs in all), on its own ports and temp dir, token auth as the script sets it.
    Every test of this module shares it; the node-death test, last, leaves 2 nodes.

    Its GCS declares a killed node dead after 3 missed 1-s health checks (Ray's default: 5 of
    3 s), and Ray Train's controller polls its workers every second (default 2 s): it takes one
    report per poll, so each epoch of a run here lasts at least a second."""
    base = _port_block(4000)  # nodes n0-n2: base + 1000 i ...; GCS, dashboard, client: + 3000
    root = Path(tempfile.mkdtemp(prefix="rcm", dir="/tmp"))  # short: unix socket paths
    singles = base + 3000
    env = _client_env(RAYCMR_LOCAL_DIR=str(root), RAYCMR_PORT_BASE=str(base),
                      RAYCMR_HEAD_PORT=str(singles), RAYCMR_DASHBOARD_PORT=str(singles + 1),
                      RAYCMR_CLIENT_PORT=str(singles + 2), RAYCMR_OBJECT_STORE_MB="128",
                      RAY_AUTH_MODE="token", RAY_health_check_period_ms="1000",
                      RAY_health_check_failure_threshold="3",
                      RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=str(POLL_S))
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "up", "--workers", "2"], check=False, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        gcs = (root / "n0" / "ray_current_cluster").read_text().strip()
        yield {"root": root, "env": env, "dashboard": f"http://127.0.0.1:{singles + 1}",
               "gcs": gcs, "head_id": _head_node_id(gcs, env)}
    finally:
        _stop(root)
        shutil.rmtree(root, ignore_errors=True)


def _head_node_id(gcs: str, env: dict[str, str]) -> str:
    code = ("import sys\nfrom ray._raylet import GcsClient\n"
            "for i, n in GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).items():\n"
            "    print(i.hex()) if n.is_head_node else None\n")
    out = subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert len(out) == 1, out
    return out[0]


# ------------------------------------------------------------------- checks before any training


def test_documented_relative_command_is_refused_in_one_line(three_nodes):
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", three_nodes["dashboard"], "--runtime-env",
         "jobs/runtime_env.yaml", "--", "raycmr", "train", "--config", "quickstart"],
        env=three_nodes["env"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-4000:]
    # the job's one line (`ray job submit` repeats the job's last log lines when it fails)
    errors = {line for line in out.splitlines() if line.startswith("raycmr: error:")}
    assert errors == {
        ("raycmr: error: train.storage_path='out/quickstart/runs' is relative: on a Ray "
        "cluster it would land in the job's temporary working-dir copy; set "
        "train.storage_path to an absolute path on storage every node shares (e.g. "
        "train.storage_path=/mnt/shared/runs) or a URI (train.storage_path=s3://bucket/runs)")}


def test_joining_a_too_small_cluster_stops_at_once(three_nodes, tmp_path):
    # 5 workers + 2 CPUs for Ray Data on the 6 CPUs of 3 nodes: Ray would wait forever
    proc = subprocess.run(
        ["raycmr", "train", "--config", "quickstart", "train.num_workers=5",
         f"train.storage_path={tmp_path}/runs"],
        env={**three_nodes["env"], "RAY_ADDRESS": three_nodes["gcs"]}, cwd=tmp_path,
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raycmr:")]
    assert errors == [
        ("raycmr: error: the Ray cluster is too small for training (5 workers x {CPU: 1} + 2 "
        "CPU for Ray Data): it needs 7 CPU in total (the cluster has 6); change "
        "train.num_workers, train.cpus_per_worker, train.use_gpu, train.worker_resources, "
        "data.reserved_cpus, or add nodes (ray start --address ...)")]
    assert not (tmp_path / "runs").exists()


# ------------------------------------- the quickstart submitted as jobs; a worker's node dies


@pytest.fixture(scope="module")
def killed_run(three_nodes, tmp_path_factory):
    """jobs/submit_quickstart.sh on the 3 nodes, one training worker per node: once the first
    checkpoint names the workers' nodes, the node of the worker not on the head is killed, and
    the job runs on to its last epoch. Returns what the tests read: the job's console, the
    run's checkpoint states, the placement before and the node killed."""
    tmp = tmp_path_factory.mktemp("submitted")
    shared = tmp / "shared"
    run = shared / "runs" / "mn"
    env = {**three_nodes["env"], "RAY_DASHBOARD_ADDRESS": three_nodes["dashboard"],
           "RAYCMR_RUN_NAME": "mn", "RAYCMR_TRAIN_ROWS": str(TRAIN_ROWS),
           "RAYCMR_EVAL_ROWS": str(EVAL_ROWS), "RAYCMR_WORKER_RESOURCES": "{raycmr_worker: 1}"}
    log = tmp / "submit.log"
    with open(log, "w") as fh:
        job = subprocess.Popen(["bash", str(SUBMIT), str(shared), f"train.epochs={EPOCHS}",
                                "train.num_to_keep=5", *TINY],
                               env=env, cwd=tmp, stdout=fh, stderr=subprocess.STDOUT)
    try:
        # the first checkpoint names the nodes the two workers run on
        deadline = time.time() + 600
        while not _states(run) and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        states = _states(run)
        assert states, log.read_text()[-4000:]
        first = min(states.values(), key=lambda s: s["epoch"])
        nodes_before = first["metrics"]["worker_nodes"].split(",")
        victim = next((n for n in nodes_before if n != three_nodes["head_id"]), None)
        if victim:
            kill = subprocess.run(["bash", str(SCRIPT), "kill-node", victim], check=False,
                                  env=three_nodes["env"], capture_output=True, text=True,
                                  timeout=60)
            assert kill.returncode == 0, kill.stdout + kill.stderr
        saved_at_kill = max(s["epoch"] for s in _states(run).values())
        code = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    return {"code": code, "out": log.read_text(), "shared": shared, "run": run,
            "states": _states(run), "nodes_before": nodes_before, "victim": victim,
            "saved_at_kill": saved_at_kill}


def test_submit_quickstart_trains_into_the_shared_path(killed_run):
    out, shared = killed_run["out"], killed_run["shared"]
    assert killed_run["code"] == 0, out[-6000:]
    assert len(re.findall(r"Job 'raysubmit_\w+' succeeded", out)) == 2
    # the first job wrote the shards the second trained from, under the shared dir given
    rows = {split: pq.ParquetDataset(shared / "shards" / split).read().num_rows
            for split in ("train", "val", "test")}
    assert rows == {"train": TRAIN_ROWS, "val": EVAL_ROWS, "test": EVAL_ROWS}
    states = killed_run["states"]
    last_name = max(states, key=lambda k: states[k]["epoch"])
    last = states[last_name]
    assert last["epoch"] == EPOCHS and last["step"] == 2 * EPOCHS  # 64 rows / (2 x 16)
    assert last["samples_seen"] == EPOCHS * TRAIN_ROWS  # counted on across the restart
    assert last["metrics"]["val_num_images"] == EVAL_ROWS
    config = (killed_run["run"] / last_name / "config.yaml").read_text()
    assert f"- {shared}/shards/train" in config  # the absolute path the job was given


def test_workers_on_different_nodes_and_a_node_death_resumes(killed_run):
    out, nodes_before, victim = killed_run["out"], killed_run["nodes_before"], killed_run["victim"]
    assert len(nodes_before) == 2 and len(set(nodes_before)) == 2, nodes_before
    assert victim is not None, nodes_before  # one worker ran off the head node
    assert killed_run["code"] == 0, out[-6000:]
    saved_at_kill = killed_run["saved_at_kill"]
    # one restart (`ray job submit` may show a worker's line twice: distinct values count)
    resumed = sorted({tuple(map(int, m)) for m in
                      re.findall(r"(?:\[raycmr\] )?resumed at epoch (\d+), step (\d+)", out)})
    assert len(resumed) == 1 and saved_at_kill < EPOCHS, (resumed, saved_at_kill)
    # resumed from the newest checkpoint registered before the node died (the one being
    # written at that moment, if any, was never registered): its epoch, its step
    epoch = resumed[0][0]
    assert epoch in (saved_at_kill, saved_at_kill - 1) and epoch >= 1, (resumed, saved_at_kill)
    assert resumed[0][1] == 2 * epoch
    last = max(killed_run["states"].values(), key=lambda s: s["epoch"])
    assert last["epoch"] == EPOCHS and last["step"] == 2 * EPOCHS
    nodes_after = last["metrics"]["worker_nodes"].split(",")
    assert len(set(nodes_after)) == 2 and victim not in nodes_after, (nodes_after, victim)
    print(f"\nplacement before: {nodes_before}; killed {victim} after epoch "
          f"{saved_at_kill}; resumed at {resumed[0]}; placement after: {nodes_after}")
