"""The per-worker training loop run by Ray Train's TorchTrainer: a DeepSpeed engine over the
cross-modal objective, fed by this worker's Ray Data stream; validation and a checkpoint each
epoch through ``ray.train.report``."""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch

from raycmr import artifacts, distributed
from raycmr.config import Config, config_from_dict
from raycmr.data.pipeline import iter_worker_batches
from raycmr.evaluate.embedding import embed_batches
from raycmr.evaluate.summary import evaluate_embeddings
from raycmr.train import checkpoint as ckpt
from raycmr.train.deepspeed_config import deepspeed_config
from raycmr.train.objective import CrossModalObjective


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    """Optimizer steps per epoch: every worker gets rows // W rows (equal streaming split),
    drops the last partial batch, and steps once per ``grad_accum`` micro-batches."""
    micro = (train_rows // cfg.train.num_workers) // cfg.train.batch_size
    return max(micro // cfg.train.grad_accum, 0)


def grl_lambda_now(cfg: Config, progress: float, samples_seen: int) -> float:
    if not cfg.loss.grl.enabled:
        return 0.0
    from raycmr.models.adversary import grl_lambda

    g = cfg.loss.grl
    return grl_lambda(g.schedule, progress=progress, samples_seen=samples_seen, lambda_=g.lambda_,
                      gamma=g.gamma, alpha=g.alpha, ramp_samples=g.ramp_samples)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _export_state_dict(engine, cfg: Config) -> dict[str, torch.Tensor] | None:
    """The full fp32 encoder state dict on rank 0 (ZeRO-3 params gathered from all ranks)."""
    encoder = engine.module.encoder
    gather = contextlib.nullcontext()
    if cfg.train.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(encoder.parameters()), modifier_rank=None)
    with gather:
        if distributed.rank() != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items()}


def _restore(engine, cfg: Config) -> dict[str, Any]:
    """Load the latest checkpoint: Ray Train's (after a worker failure or run restore), else
    ``train.resume_from``. Returns the saved client state ({} when starting fresh)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.train.resume_from:
        checkpoint = ray.train.Checkpoint(str(artifacts.find_checkpoint(cfg.train.resume_from)))
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(
            os.path.join(directory, ckpt.DS_DIR), tag=ckpt.DS_TAG,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    return client_state or {}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed

    cfg = config_from_dict(loop_config["cfg"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_rows = int(loop_config["train_rows"])
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed + distributed.rank())
    np.random.seed(cfg.train.seed + distributed.rank())

    world, rank = distributed.world_size(), distributed.rank()
    per_epoch = steps_per_epoch(cfg, train_rows)
    if per_epoch == 0:
        raise ValueError(
            f"{train_rows} training rows give no full batch for {world} workers x batch "
            f"{cfg.train.batch_size}: lower train.batch_size or train.num_workers"
        )
    total_steps = per_epoch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)

    model = CrossModalObjective(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=deepspeed_config(cfg, total_steps),
        dist_init_required=False,
    )
    device = engine.device
    dtype = next(engine.module.parameters()).dtype

    state = _restore(engine, cfg)
    start_epoch = int(state.get("epoch", 0))
    samples_seen = int(state.get("samples_seen", 0))
    # dropped-record counts: global totals of earlier runs (saved by rank 0) + this run's
    dropped_before: collections.Counter[str] = collections.Counter(state.get("dropped", {}))
    dropped_run: collections.Counter[str] = collections.Counter()
    if rank == 0 and state:
        print(f"[raycmr] resumed at epoch {start_epoch}, step {engine.global_steps}")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.train.epochs):
        if engine.global_steps >= total_steps:
            break
        engine.train()
        sums: collections.defaultdict[str, float] = collections.defaultdict(float)
        n_logged, window_rows, window_start, epoch_start = 0, 0, time.perf_counter(), time.time()
        dropped_epoch: collections.Counter[str] = collections.Counter()
        batches = iter_worker_batches(
            train_shard, cfg.train.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed + epoch * 1000 + rank, drop_last=True,
        )
        for micro, (batch, dropped) in enumerate(distributed.while_all_have(batches)):
            dropped_epoch.update(dropped)
            progress = engine.global_steps / max(total_steps, 1)
            lam = grl_lambda_now(cfg, progress, samples_seen)
            out = engine(_to_device(batch, device, dtype), grl_lambda=lam)
            engine.backward(out["loss"])
            engine.step()
            rows = int(batch["group"].shape[0])
            samples_seen += int(distributed.all_reduce_sum(rows)) if world > 1 else rows
            window_rows += rows
            for k, v in out.items():
                sums[k] += float(v)
            n_logged += 1
            if (micro + 1) % cfg.train.grad_accum == 0 and engine.global_steps % cfg.train.log_every == 0:
                elapsed = time.perf_counter() - window_start
                if rank == 0:
                    line = {k: round(float(v), 4) for k, v in out.items()}
                    print(f"[raycmr] epoch {epoch} step {engine.global_steps}/{total_steps} "
                          f"lr {engine.get_lr()[0]:.2e} grl_lambda {lam:.3f} "
                          f"samples/s {window_rows * world / max(elapsed, 1e-9):.1f} "
                          f"dropped {dict(dropped_epoch)} {line}", flush=True)
                window_rows, window_start = 0, time.perf_counter()
            _maybe_inject_failure(loop_config.get("inject_failure"), engine.global_steps)
            if engine.global_steps >= total_steps:
                break

        epoch_time = time.time() - epoch_start
        dropped_run.update(dropped_epoch)
        dropped_all = collections.Counter(distributed.sum_counters(dropped_run)) + dropped_before
        metrics: dict[str, Any] = {f"train_{k}": distributed.all_reduce_mean(v / max(n_logged, 1))
                                   for k, v in sorted(sums.items())}
        metrics.update(
            epoch=epoch + 1, step=engine.global_steps, samples_seen=samples_seen,
            lr=float(engine.get_lr()[0]), epoch_time_s=epoch_time,
            samples_per_s=samples_seen_epoch(n_logged, cfg, world) / max(epoch_time, 1e-9),
            dropped_records=sum(dropped_all.values()),
            **{f"dropped_{r}": c for r, c in sorted(dropped_all.items())},
        )
        metrics.update(validate(engine, val_shard, cfg, device, dtype))
        save_now = (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or \
            epoch + 1 == cfg.train.epochs or engine.global_steps >= total_steps
        client_state = {"epoch": epoch + 1, "samples_seen": samples_seen,
                        "dropped": dict(dropped_all)}
        if save_now:
            report_with_checkpoint(engine, cfg, metrics, client_state)
        else:
            ray.train.report(metrics)


def _maybe_inject_failure(spec: dict[str, Any] | None, step: int) -> None:
    """Fault-injection for tests of automatic recovery: fail once, at ``spec["step"]``, on
    rank 0 (a marker file remembers that it happened)."""
    if not spec or step != spec["step"] or distributed.rank() != 0:
        return
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text(str(step))
        raise RuntimeError(f"injected worker failure at step {step}")


def samples_seen_epoch(micro_batches: int, cfg: Config, world: int) -> int:
    return micro_batches * cfg.train.batch_size * world


def report_with_checkpoint(engine, cfg: Config, metrics: dict[str, Any],
                           client_state: dict[str, Any]) -> None:
    state_dict = _export_state_dict(engine, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(os.path.join(tmp, ckpt.DS_DIR), tag=ckpt.DS_TAG,
                               client_state=client_state)
        if state_dict is not None:
            artifacts.write_export(tmp, state_dict, cfg,
                                   {**client_state, "step": engine.global_steps, "metrics": metrics})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@torch.no_grad()
def validate(engine, val_shard, cfg: Config, device, dtype) -> dict[str, float]:
    """R@K both ways (and mAP when labels exist) on the whole validation set. Every rank embeds
    the full set, so that ZeRO-3's parameter gathering sees the same forward calls everywhere."""
    if val_shard is None:
        return {}
    engine.eval()
    encoder = engine.module.encoder
    batches = (_to_device(b, device, dtype) for b, _ in iter_worker_batches(
        val_shard, cfg.eval.batch_size, shuffle_buffer=0, seed=0, drop_last=False))
    emb = embed_batches(encoder, batches)
    engine.train()
    if emb["img"].shape[0] == 0:
        return {}
    return {f"val_{k}": v for k, v in evaluate_embeddings(emb).items()}
