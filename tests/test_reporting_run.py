"""A real 2-worker run with the console's sinks attached: the TensorBoard event files, read
back with TensorBoard's own reader, hold exactly what the run reported, and a worker's line
reaches the driver once."""

import math

import numpy as np
import pytest
from conftest import WIKIPEDIA as WIKI
from conftest import needs_wikipedia

from raycmr.config import load_config

pytestmark = pytest.mark.ray


class Recorder:
    """A sink that keeps every update."""

    def __init__(self):
        self.updates = []

    def on_update(self, update):
        self.updates.append(update)

    def close(self):
        pass


def _scalars(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def _deepspeed_lrs(cfg, total_steps):
    """The learning rate after each optimizer step, from DeepSpeed's own scheduler class
    stepped alone with the run's scheduler settings."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from raycmr.train.deepspeed_config import deepspeed_config

    params = deepspeed_config(cfg, total_steps)["scheduler"]["params"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = WarmupCosineLR(opt, **params)
    lrs = {}
    for step in range(1, total_steps + 1):
        opt.step()
        sched.step()
        lrs[step] = sched.get_lr()[0]
    return lrs


@needs_wikipedia
def test_tensorboard_events_hold_what_the_run_reported(ray_cluster, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raycmr.data.writers import write_wikipedia_shards
    from raycmr.reporting.tensorboard import TensorBoardSink
    from raycmr.train.run import train

    shards = tmp_path / "wiki"
    write_wikipedia_shards(WIKI, shards)
    cfg = load_config("wikipedia", [
        f"data.train=[{shards}/train]", f"data.val=[{shards}/val]",
        "loss.grl.enabled=true", "loss.grl.schedule=dann", "loss.grl.weight=0.1",
        "train.epochs=2", "train.num_workers=2", "train.log_every=4",
        "train.checkpoint_every_epochs=1", "train.num_to_keep=0", "train.torch_threads=1",
        f"train.storage_path={tmp_path}/runs", "train.name=tb",
    ])
    recorder, logdir = Recorder(), tmp_path / "tb"
    result = train(cfg, name="tb", sinks=[TensorBoardSink(logdir), recorder])
    assert result.error is None
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()

    # per epoch: every reported number, as Ray Train kept it with each checkpoint
    reports = [u for u in recorder.updates if u["kind"] == "report"]
    assert len(reports) == 2 == len(result.best_checkpoints)
    by_path = {ckpt.path: metrics for ckpt, metrics in result.best_checkpoints}
    for report in reports:
        kept = by_path[report["checkpoint"]]
        step = kept["step"]
        for key in ("val_rsum", "val_avg_map", "val_t2i_r1", "val_i2t_medr"):
            assert _scalars(acc, f"val/{key[4:]}")[step] == np.float32(kept[key]), key
        for key in ("train_loss", "train_adversary", "train_disc_acc", "lr", "dropped_records"):
            assert _scalars(acc, f"epoch/{key}")[step] == np.float32(kept[key]), key

    # per step: every log_every steps, the lr of DeepSpeed's schedule, the DANN GRL lambda
    total = reports[-1]["metrics"]["step"]
    logged = sorted(_scalars(acc, "train/lr"))
    assert logged == list(range(4, total + 1, 4))
    ref_lr = _deepspeed_lrs(cfg, total)
    g = cfg.loss.grl
    for step, value in _scalars(acc, "train/lr").items():
        assert value == pytest.approx(ref_lr[step], rel=1e-6)
    for step, value in _scalars(acc, "train/grl_lambda").items():
        progress = (step - 1) / total  # lambda is set before the step's update
        expected = g.alpha * (2.0 / (1.0 + math.exp(-g.gamma * progress)) - 1.0)
        assert value == pytest.approx(expected, rel=1e-6)
    disc = _scalars(acc, "train/disc_acc")
    assert sorted(disc) == logged and all(0.0 <= v <= 1.0 for v in disc.values())
    # the console's step updates are the event file's steps, value for value
    steps = {u["step"]: u for u in recorder.updates if u["kind"] == "step"}
    assert sorted(steps) == logged
    for step, value in _scalars(acc, "train/loss").items():
        assert value == np.float32(steps[step]["values"]["loss"])


def test_worker_print_reaches_the_driver_once(ray_cluster, tmp_path):
    """Train V2 patches print() in workers to log the line *and* tee it to the wrapped stdout
    (each line twice on the driver); worker_print writes it once."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import logging

        from raycmr.reporting.board import worker_print

        seen = []

        class Keep(logging.Handler):
            def emit(self, record):
                seen.append(record.getMessage())

        logging.getLogger().addHandler(Keep())
        print("plain-print-line")
        worker_print("worker-print-line")
        with open(config["out"], "w") as fh:
            json.dump({"plain": seen.count("plain-print-line"),
                       "worker": seen.count("worker-print-line")}, fh)

    out = tmp_path / "counts.json"
    TorchTrainer(loop, train_loop_config={"out": str(out)},
                 scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=str(tmp_path), name="print")).fit()
    counts = json.loads(out.read_text())
    # the plain print also went through Train's logger (the second copy); worker_print did not
    assert counts == {"plain": 1, "worker": 0}
