"""The one per-worker training loop run by Ray Train's TorchTrainer, for every task.

A DeepSpeed engine over the task's module (:mod:`raycmr.train.task`), fed by this worker's Ray
Data streams. Each epoch runs exactly ``steps_per_epoch * grad_accum`` micro-steps, a count
fixed on the driver so that workers never agree per step (Ray Data's equal split gives every
worker the same number of full batches; one whose stream runs short repeats its last batch,
counted), then one reduction of the epoch's metrics, sharded validation and
``ray.train.report`` (with a checkpoint when due).
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import ray.data
import ray.train
import torch

from raycmr import artifacts, distributed
from raycmr.config import Config, config_from_dict
from raycmr.data.pipeline import iter_worker_batches
from raycmr.reporting.board import WorkerProgress
from raycmr.train.deepspeed_config import deepspeed_config
from raycmr.train.placement import worker_nodes
from raycmr.train.registry import make_task
from raycmr.train.task import StepInfo, Task

T = TypeVar("T")

#: the DeepSpeed part of a checkpoint directory (engine state of every rank); the rest is the
#: DeepSpeed-free export of :mod:`raycmr.artifacts`
DS_DIR, DS_TAG = "ds", "ds"

#: where a training step's time goes (``step_ms_<phase>`` epoch metrics, per micro-step): the
#: wait for the next batch, its copy to the device, the task's forward (with the cross-worker
#: gather), DeepSpeed's backward and optimizer step, and the loop's bookkeeping. An epoch's
#: first batch (Ray Data starts a new execution) is ``first_batch_s`` instead of ``data``.
STEP_PHASES = ("data", "to_device", "forward", "backward", "optimizer", "bookkeeping")


def steps_per_epoch(cfg: Config, train_rows: int) -> int:
    """Optimizer steps per epoch: every worker gets rows // W rows (equal streaming split),
    drops the last partial batch, and steps once per ``grad_accum`` micro-batches."""
    micro = (train_rows // cfg.train.num_workers) // cfg.train.batch_size
    return max(micro // cfg.train.grad_accum, 0)


class FixedSteps(Generic[T]):
    """Exactly ``count`` items of ``items``; when it runs short, its last item again (counted
    in ``repeated``). Raises ValueError when ``items`` is empty but ``count`` is not."""

    def __init__(self, items: Iterable[T], count: int):
        self.items, self.count, self.repeated = items, count, 0

    def __iter__(self) -> Iterator[T]:
        iterator, last = iter(self.items), _NONE
        for _ in range(self.count):
            item = next(iterator, _NONE)
            if item is _NONE:
                if last is _NONE:
                    raise ValueError("this worker's training stream has no valid batch at all")
                self.repeated += 1
                item = last
            last = item
            yield item


_NONE: Any = object()


class StepTimer:
    """A small profiler: ``lap(phase)`` adds the time since the previous lap to ``phase``."""

    def __init__(self) -> None:
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now


@dataclass
class WorkerEpoch:
    """What one worker reports of an epoch; gathered once, at its end."""

    parts: dict[str, float] = field(default_factory=dict)  # metric part sums over micro-steps
    micro_steps: int = 0
    rows: int = 0
    repeated: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: dict[str, float] = field(default_factory=dict)  # by phase (StepTimer)

    def add(self, parts: dict[str, float], rows: int) -> None:
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
        self.micro_steps += 1
        self.rows += rows


def epoch_metrics(workers: list[WorkerEpoch]) -> dict[str, Any]:
    """The epoch's training metrics from every worker's: per-micro-step means of the metric
    parts and phase times averaged over workers; rows and repeated batches summed."""
    world = len(workers)

    def mean(get) -> float:
        return sum(get(w) / max(w.micro_steps, 1) for w in workers) / world

    keys = sorted({k for w in workers for k in w.parts})
    return {**{f"train_{k}": mean(lambda w, k=k: w.parts.get(k, 0.0)) for k in keys},
            "repeated_batches": sum(w.repeated for w in workers),
            **{f"step_ms_{k}": 1000 * mean(lambda w, k=k: w.seconds.get(k, 0.0))
               for k in STEP_PHASES},
            "first_batch_s": sum(w.seconds.get("first_batch", 0.0) for w in workers) / world}


@dataclass
class LoopPlan:
    """The run's shape, fixed on the driver (``loop_config``)."""

    steps_per_epoch: int
    total_steps: int  # the LR schedule's length; training stops there
    epochs: int  # of this run
    epoch_offset: int = 0  # epochs of earlier runs (DCKT rounds)
    seed_offset: int = 0

    @classmethod
    def of(cls, loop_config: dict[str, Any]) -> LoopPlan:
        return cls(int(loop_config["steps_per_epoch"]), int(loop_config["total_steps"]),
                   int(loop_config["epochs"]), int(loop_config.get("epoch_offset", 0)),
                   int(loop_config.get("seed_offset", 0)))


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
            os.path.join(directory, DS_DIR), tag=DS_TAG,
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
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=task.optimizer_groups(module),
        config=deepspeed_config(cfg, total_steps),
        dist_init_required=False,
    )
    return engine


def train_step(engine, task: Task, batch: Any, info: StepInfo,
               timer: StepTimer | None = None) -> dict[str, torch.Tensor]:
    """One micro-step: the task's forward and backward (DeepSpeed's, unless the task has its
    own) and DeepSpeed's step (which steps the optimizer every ``grad_accum`` micro-steps);
    ``timer`` laps each phase."""
    timer = timer or StepTimer()
    out = task.forward(engine, batch, info)
    timer.lap("forward")
    task.backward(engine, out)
    timer.lap("backward")
    engine.step()
    timer.lap("optimizer")
    return out


def run_epoch(engine, task: Task, cfg: Config, plan: LoopPlan, shards: dict[str, Any],
              epoch: int, seed: int, samples_seen: int, reporter: WorkerProgress,
              inject_failure: dict[str, Any] | None) -> WorkerEpoch:
    """This worker's micro-steps of one epoch (stopping at ``plan.total_steps``)."""
    world, accum = distributed.world_size(), cfg.train.grad_accum
    dtype = next(engine.module.parameters()).dtype
    mine, timer = WorkerEpoch(), StepTimer()
    window_rows, window_start = 0, time.perf_counter()
    steps = FixedSteps(task.batches(shards, epoch, seed), plan.steps_per_epoch * accum)
    for batch, dropped in steps:
        timer.lap("data" if mine.micro_steps else "first_batch")
        mine.dropped.update(dropped)
        info = StepInfo(plan.epoch_offset + epoch, engine.global_steps, plan.total_steps,
                        samples_seen + mine.rows * world)
        on_device = to_device(batch, engine.device, dtype)
        timer.lap("to_device")
        parts = {k: float(v.detach()) for k, v in
                 train_step(engine, task, on_device, info, timer).items()}
        rows = task.rows(batch)
        mine.add(parts, rows)
        window_rows += rows
        if mine.micro_steps % accum == 0 and engine.global_steps % cfg.train.log_every == 0:
            elapsed = time.perf_counter() - window_start
            reporter.step(
                epoch=plan.epoch_offset + epoch, epochs=plan.epoch_offset + plan.epochs,
                step=engine.global_steps, total_steps=plan.total_steps,
                epoch_steps=plan.steps_per_epoch, epoch_step=mine.micro_steps // accum,
                samples_per_s=window_rows * world / max(elapsed, 1e-9),
                values={**parts, "lr": float(engine.get_lr()[0]),
                        "grl_lambda": parts.get("grl_lambda", 0.0)})
            window_rows, window_start = 0, time.perf_counter()
        _maybe_inject_failure(inject_failure, engine.global_steps)
        timer.lap("bookkeeping")
        if engine.global_steps >= plan.total_steps:
            break
    mine.repeated, mine.seconds = steps.repeated, dict(timer.seconds)
    return mine


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """``loop_config``: ``cfg`` (dict), ``task`` + ``task_params``, the :class:`LoopPlan`
    fields, ``board`` (progress) and ``inject_failure`` (tests)."""
    cfg, plan = config_from_dict(loop_config["cfg"]), LoopPlan.of(loop_config)
    ray.data.DataContext.get_current().enable_progress_bars = False
    task = make_task(loop_config["task"], cfg, loop_config.get("task_params"))
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    seed = cfg.train.seed + plan.seed_offset + distributed.rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    engine = build_engine(task, cfg, plan.total_steps)
    state = _restore(engine, cfg)
    samples_seen, history = int(state.get("samples_seen", 0)), list(state.get("history", []))
    # dropped-record counts: global totals of earlier runs (saved by rank 0) + this run's
    dropped: collections.Counter[str] = collections.Counter(state.get("dropped", {}))
    reporter = WorkerProgress(loop_config.get("board"), distributed.rank())
    if state:
        reporter.note(f"resumed at epoch {plan.epoch_offset + task.first_epoch(state)}, step "
                      f"{engine.global_steps}")
    nodes = worker_nodes()
    shards = {name: ray.train.get_dataset_shard(name) for name in task.train_splits}
    val_shard = _dataset_shard("val")
    task.setup(shards, seed)
    for epoch in range(task.first_epoch(state), plan.epochs):
        if engine.global_steps >= plan.total_steps:
            break
        engine.train()
        start = time.time()
        workers = distributed.gather_objects(run_epoch(
            engine, task, cfg, plan, shards, epoch, seed, samples_seen, reporter,
            loop_config.get("inject_failure")))
        epoch_time, rows = time.time() - start, sum(w.rows for w in workers)
        samples_seen += rows
        dropped += collections.Counter(distributed.merge_counts(w.dropped for w in workers))
        metrics: dict[str, Any] = {
            **epoch_metrics(workers), "epoch": plan.epoch_offset + epoch + 1,
            "step": engine.global_steps, "samples_seen": samples_seen,
            "lr": float(engine.get_lr()[0]), "epoch_time_s": epoch_time,
            "samples_per_s": rows / max(epoch_time, 1e-9),
            "dropped_records": sum(dropped.values()), "worker_nodes": nodes,
            **{f"dropped_{r}": c for r, c in sorted(dropped.items())},
            **task.epoch_metrics(epoch + 1),
            **validate(engine, task, val_shard, cfg)}
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        client_state = {"epoch": plan.epoch_offset + epoch + 1, "samples_seen": samples_seen,
                        "dropped": dict(dropped), "history": history,
                        **task.client_state(epoch + 1)}
        if ((epoch + 1) % cfg.train.checkpoint_every_epochs == 0 or epoch + 1 == plan.epochs
                or engine.global_steps >= plan.total_steps):
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
        engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG,
                               client_state=client_state)
        if model_state is not None:
            artifacts.write_export(tmp, model_state, cfg,
                                   {**client_state, "step": engine.global_steps, "metrics": metrics},
                                   extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@torch.no_grad()
def validate(engine, task: Task, val_shard, cfg: Config) -> dict[str, float]:
    """The task's validation metrics; each rank runs its share of the validation batches
    (:func:`raycmr.distributed.sharded_map`; under ZeRO-3 with equal forward counts)."""
    if val_shard is None:
        return {}
    engine.eval()
    device, dtype = engine.device, next(engine.module.parameters()).dtype

    def shard_map(fn):
        batches = (b for b, _ in iter_worker_batches(
            val_shard, cfg.eval.batch_size, shuffle_buffer=0, seed=0, drop_last=False))
        return distributed.sharded_map(batches, lambda b: fn(to_device(b, device, dtype)),
                                       equal_calls=cfg.train.zero_stage == 3)

    metrics = task.validate(engine.module, shard_map)
    engine.train()
    return metrics
