"""The one per-worker training loop run by Ray Train's TorchTrainer, for every task.

A DeepSpeed engine over the task's module, fed by this worker's Ray Data streams; each epoch:
exactly ``steps_per_epoch * grad_accum`` micro-steps, then one reduction of the epoch's metrics,
sharded validation and ``ray.train.report`` (with a checkpoint when due). What varies by model is
the task (:mod:`raycmr.train.task`, one folder per method).

Collectives. A micro-step makes only the task's own (the dual encoder: one packed gather of the
global batch) and DeepSpeed's gradient all-reduce. The step count of an epoch is fixed on the
driver: Ray Data's equal streaming split gives every worker ``rows // W`` rows, hence the same
number of full batches; bad rows are dropped inside a batch (a shorter batch, which the packed
gather handles), so a worker can only fall short when a whole batch was bad, and then it
repeats its last batch (counted in ``repeated_batches``) instead of every worker agreeing before
every step. ``samples_seen`` between reports is this worker's rows times ``W`` (what the GRL's
``dynamic`` schedule reads); the exact count over workers is summed once per epoch.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import ray.data
import ray.train
import torch

from raycmr import artifacts, distributed
from raycmr.config import Config, config_from_dict
from raycmr.data.pipeline import iter_worker_batches
from raycmr.reporting.board import WorkerProgress
from raycmr.train import checkpoint as ckpt
from raycmr.train.deepspeed_config import deepspeed_config
from raycmr.train.placement import worker_nodes
from raycmr.train.registry import make_task
from raycmr.train.task import StepInfo, Task

T = TypeVar("T")


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    """Optimizer steps per epoch: every worker gets rows // W rows (equal streaming split),
    drops the last partial batch, and steps once per ``grad_accum`` micro-batches."""
    micro = (train_rows // cfg.train.num_workers) // cfg.train.batch_size
    return max(micro // cfg.train.grad_accum, 0)


def fixed_steps(items: Iterable[T], count: int, repeated: list[int]) -> Iterator[T]:
    """Exactly ``count`` items of ``items``; if it runs short, its last item again (each repeat
    adds 1 to ``repeated[0]``). Raises ValueError when ``items`` is empty but ``count`` is not."""
    last = _NONE
    iterator = iter(items)
    for _ in range(count):
        item = next(iterator, _NONE)
        if item is _NONE:
            if last is _NONE:
                raise ValueError("this worker's training stream has no valid batch at all")
            repeated[0] += 1
            item = last
        last = item
        yield item


_NONE: Any = object()


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Tensors (in nested dicts) onto ``device``; floating tensors cast to the engine's dtype."""
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    v = batch.to(device, non_blocking=True)
    return v.to(dtype) if v.is_floating_point() else v


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


def _dataset_shard(name: str):
    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:  # Train V2 raises for a dataset the trainer was not given
        return None


def build_engine(task: Task, cfg: Config, total_steps: int):
    """The DeepSpeed engine over the task's module (the process group already exists)."""
    import deepspeed

    module = task.build_module()
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=params, config=deepspeed_config(cfg, total_steps),
        dist_init_required=False,
    )
    return engine


def train_step(engine, task: Task, batch: Any, info: StepInfo,
               seconds: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """One micro-step: the task's forward, DeepSpeed's backward and step (which steps the
    optimizer every ``grad_accum`` micro-steps). ``seconds``: each phase's time is added to
    ``forward``, ``backward``, ``optimizer``."""
    t0 = time.perf_counter()
    out = task.forward(engine, batch, info)
    t1 = time.perf_counter()
    engine.backward(out["loss"])
    t2 = time.perf_counter()
    engine.step()
    if seconds is not None:
        t3 = time.perf_counter()
        seconds["forward"] += t1 - t0
        seconds["backward"] += t2 - t1
        seconds["optimizer"] += t3 - t2
    return out


#: where a training step's time goes (``step_ms_<phase>`` epoch metrics, per micro-step): the
#: wait for the next batch from Ray Data, its copy to the device, the task's forward (with the
#: cross-worker gather), DeepSpeed's backward and optimizer step, and the loop's bookkeeping
#: (reading the loss parts, progress reports). The wait for an epoch's first batch (Ray Data
#: starts a new execution each epoch) is not in ``data`` but in ``first_batch_s``.
STEP_PHASES = ("data", "to_device", "forward", "backward", "optimizer", "bookkeeping")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``loop_config``: ``cfg`` (dict), ``task`` + ``task_params``, ``steps_per_epoch``,
    ``epochs`` (of this run), ``epoch_offset`` (epochs of earlier runs, DCKT rounds),
    ``total_steps`` (the LR schedule's length; training stops there), ``inject_failure``."""
    cfg = config_from_dict(loop_config["cfg"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    task = make_task(loop_config["task"], cfg, loop_config.get("task_params"))
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    world, rank = distributed.world_size(), distributed.rank()
    seed = cfg.train.seed + int(loop_config.get("seed_offset", 0)) + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    per_epoch, total_steps = int(loop_config["steps_per_epoch"]), int(loop_config["total_steps"])
    epochs, epoch_offset = int(loop_config["epochs"]), int(loop_config.get("epoch_offset", 0))
    micro_per_epoch = per_epoch * cfg.train.grad_accum

    engine = build_engine(task, cfg, total_steps)
    device = engine.device
    dtype = next(engine.module.parameters()).dtype
    state = _restore(engine, cfg)
    start_epoch = task.first_epoch(state)
    samples_seen = int(state.get("samples_seen", 0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    # dropped-record counts: global totals of earlier runs (saved by rank 0) + this run's
    dropped_before: collections.Counter[str] = collections.Counter(state.get("dropped", {}))
    dropped_run: collections.Counter[str] = collections.Counter()
    reporter = WorkerProgress(loop_config.get("board"), rank)
    if state:
        reporter.note(f"resumed at epoch {epoch_offset + start_epoch}, step "
                      f"{engine.global_steps}")

    nodes = worker_nodes()
    shards = {name: ray.train.get_dataset_shard(name) for name in task.train_splits}
    val_shard = _dataset_shard("val")
    task.setup(shards, seed)

    for epoch in range(start_epoch, epochs):
        if engine.global_steps >= total_steps:
            break
        engine.train()
        sums: collections.defaultdict[str, float] = collections.defaultdict(float)
        n_micro, local_rows, window_rows = 0, 0, 0
        window_start, epoch_start = time.perf_counter(), time.time()
        dropped_epoch: collections.Counter[str] = collections.Counter()
        repeated = [0]
        seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        mark = time.perf_counter()
        for batch, dropped in fixed_steps(task.batches(shards, epoch, seed), micro_per_epoch,
                                          repeated):
            got = time.perf_counter()
            seconds["data" if n_micro else "first_batch"] += got - mark
            dropped_epoch.update(dropped)
            info = StepInfo(epoch_offset + epoch, engine.global_steps, total_steps,
                            samples_seen + local_rows * world)
            on_device = to_device(batch, device, dtype)
            seconds["to_device"] += time.perf_counter() - got
            out = train_step(engine, task, on_device, info, seconds)
            done = time.perf_counter()
            rows = task.rows(batch)
            local_rows += rows
            window_rows += rows
            parts = {k: float(v.detach()) for k, v in out.items()}
            for k, v in parts.items():
                sums[k] += v
            n_micro += 1
            if n_micro % cfg.train.grad_accum == 0 and engine.global_steps % cfg.train.log_every == 0:
                elapsed = time.perf_counter() - window_start
                reporter.step(
                    epoch=epoch_offset + epoch, epochs=epoch_offset + epochs,
                    step=engine.global_steps, total_steps=total_steps, epoch_steps=per_epoch,
                    epoch_step=n_micro // cfg.train.grad_accum,
                    samples_per_s=window_rows * world / max(elapsed, 1e-9),
                    values={**parts, "lr": float(engine.get_lr()[0]),
                            "grl_lambda": parts.get("grl_lambda", 0.0)})
                window_rows, window_start = 0, time.perf_counter()
            _maybe_inject_failure(loop_config.get("inject_failure"), engine.global_steps)
            mark = time.perf_counter()
            seconds["bookkeeping"] += mark - done
            if engine.global_steps >= total_steps:
                break

        epoch_time = time.time() - epoch_start
        # the epoch's one reduction: metric parts, rows, repeats, dropped records by reason and
        # the step's time by phase
        parts_all = distributed.gather_objects(
            ({k: v / max(n_micro, 1) for k, v in sums.items()}, local_rows, repeated[0],
             dict(dropped_epoch), {k: 1000 * v / max(n_micro, 1) for k, v in seconds.items()
                                   if k in STEP_PHASES} | {"first_batch_s": seconds["first_batch"]}))
        rows_epoch = sum(p[1] for p in parts_all)
        samples_seen += rows_epoch
        dropped_run.update(distributed.merge_counts(p[3] for p in parts_all))
        dropped_all = dropped_run + dropped_before
        metrics: dict[str, Any] = {
            f"train_{k}": sum(p[0].get(k, 0.0) for p in parts_all) / world
            for k in sorted(sums)}
        metrics.update(
            epoch=epoch_offset + epoch + 1, step=engine.global_steps, samples_seen=samples_seen,
            lr=float(engine.get_lr()[0]), epoch_time_s=epoch_time,
            samples_per_s=rows_epoch / max(epoch_time, 1e-9),
            repeated_batches=sum(p[2] for p in parts_all),
            **{f"step_ms_{k}": sum(p[4].get(k, 0.0) for p in parts_all) / world
               for k in STEP_PHASES},
            first_batch_s=sum(p[4]["first_batch_s"] for p in parts_all) / world,
            dropped_records=sum(dropped_all.values()), worker_nodes=nodes,
            **{f"dropped_{r}": c for r, c in sorted(dropped_all.items())},
        )
        metrics.update(task.epoch_metrics(epoch + 1))
        metrics.update(validate(engine, task, val_shard, cfg, device, dtype))
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        client_state = {"epoch": epoch_offset + epoch + 1, "samples_seen": samples_seen,
                        "dropped": dict(dropped_all), "history": history,
                        **task.client_state(epoch + 1)}
        save_now = (epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or \
            epoch + 1 == epochs or engine.global_steps >= total_steps
        if save_now:
            report_with_checkpoint(engine, task, cfg, metrics, client_state)
            _maybe_inject_failure(loop_config.get("inject_failure"), engine.global_steps,
                                  after_checkpoint=True)
        else:
            ray.train.report(metrics)


def _maybe_inject_failure(spec: dict[str, Any] | None, step: int, *,
                          after_checkpoint: bool = False) -> None:
    """Fault-injection for tests of automatic recovery: fail once, at ``spec["step"]``, on rank
    ``spec.get("rank", 0)`` (a marker file remembers that it happened). With
    ``spec["after_checkpoint"]`` the worker process dies at once (``os._exit``, as if killed)
    right after reporting the checkpoint of that step, before Ray Train can register it."""
    if (not spec or step != spec["step"] or distributed.rank() != spec.get("rank", 0)
            or bool(spec.get("after_checkpoint")) != after_checkpoint):
        return
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text(str(step))
        if after_checkpoint:
            os._exit(1)
        raise RuntimeError(f"injected worker failure at step {step}")


def _export(engine, task: Task, cfg: Config):
    """The task's DeepSpeed-free weights on rank 0, ``(None, {})`` elsewhere (ZeRO-3 parameters
    gathered from all ranks first)."""
    module = engine.module
    gather = contextlib.nullcontext()
    if cfg.train.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        if distributed.rank() != 0:
            return None, {}
        return task.export(module)


def report_with_checkpoint(engine, task: Task, cfg: Config, metrics: dict[str, Any],
                           client_state: dict[str, Any]) -> None:
    """DeepSpeed state (``ds/``) + the DeepSpeed-free export (``model.pt``, config, state, and
    the task's extra files) in one checkpoint, reported to Ray Train."""
    model_state, extra = _export(engine, task, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(os.path.join(tmp, ckpt.DS_DIR), tag=ckpt.DS_TAG,
                               client_state=client_state)
        if model_state is not None:
            artifacts.write_export(tmp, model_state, cfg,
                                   {**client_state, "step": engine.global_steps, "metrics": metrics},
                                   extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@torch.no_grad()
def validate(engine, task: Task, val_shard, cfg: Config, device, dtype) -> dict[str, float]:
    """The task's validation metrics; each rank runs its share of the validation batches
    (:func:`raycmr.distributed.sharded_map`; under ZeRO-3 with equal forward counts)."""
    if val_shard is None:
        return {}
    engine.eval()

    def shard_map(fn):
        batches = (b for b, _ in iter_worker_batches(
            val_shard, cfg.eval.batch_size, shuffle_buffer=0, seed=0, drop_last=False))
        return distributed.sharded_map(batches, lambda b: fn(to_device(b, device, dtype)),
                                       equal_calls=cfg.train.zero_stage == 3)

    metrics = task.validate(engine.module, shard_map)
    engine.train()
    return metrics
