"""The task interface: what varies between the models the one training engine trains.

The engine (:mod:`raycmr.train.loop` per worker, :mod:`raycmr.train.trainer` on the driver) owns
everything every model needs: seeding, the DeepSpeed engine, restore from a checkpoint, a step
count per epoch fixed on the driver (no per-step agreement between workers), backward + step,
the log line, the once-per-epoch reduction of metrics and dropped-record counts, sharded
validation, the checkpoint (DeepSpeed state + a DeepSpeed-free export) and ``ray.train.report``.
A task (open_clip's task pattern) says the rest:

- ``build_module()``: the ``nn.Module`` DeepSpeed wraps (every trainable part of the model);
- ``setup(shards)``: per-worker preparation once the engine is restored (e.g. DCKT reads its
  small target split into memory);
- ``batches(shards, epoch, seed)``: this worker's micro-batches of one epoch as
  ``(batch, dropped)`` pairs; ``batch`` is a dict of tensors (nested dicts allowed: DCKT pairs a
  source and a target batch); the engine moves it to the device and runs exactly
  ``steps_per_epoch * grad_accum`` of them;
- ``forward(engine, batch, step)``: the loss (key ``loss``, with grad) and named detached metric
  parts of one micro-batch; it calls ``engine(...)`` so that DeepSpeed sees the forward;
- ``backward(engine, out)``: the backward of ``forward``'s ``out["loss"]`` (default
  ``engine.backward``; the dual encoder's GradCache re-encodes its chunks here);
- ``rows(batch)``: training pairs in a batch (throughput and ``samples_seen``);
- ``validate(module, shard_map)``: the validation metrics (``val_*``, on rank 0; ``{}`` on the
  others). ``shard_map(fn)`` runs ``fn(batch) -> dict of row-aligned tensors`` on this worker's
  share of the validation batches and returns, on rank 0, every batch's result in the order
  of the whole set (a single process would produce the same). What the metric is - retrieval
  R@K/mAP of the dual encoder's embeddings, or text->image R@1 after re-ranking a fast model's
  top-K with a slow model - is the task's choice;
- ``export(module)``: the DeepSpeed-free weights on rank 0: the state dict written as
  ``model.pt`` (with config and state, :func:`raycmr.artifacts.write_export`) and extra
  ``{file name: state dict}`` files;
- ``first_epoch(state)``, ``client_state()``, ``epoch_metrics()``: what the task keeps in the
  checkpoint's client state and adds to each epoch's report.

A task is built on every worker from the config and a small JSON-able ``params`` dict the driver
computed (e.g. DCKT's round and MMD weight). Register a new one in
:data:`raycmr.train.registry.METHODS` (its own folder under ``train/``) and start it with
``build_trainer(cfg, task=NAME, task_params=..., datasets=...)``; the loop does not change.
"""

from __future__ import annotations

import collections
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raycmr.config import Config

Batch = dict[str, Any]
ShardMap = Callable[[Callable[[Batch], dict[str, torch.Tensor]]], "list[dict[str, Any]] | None"]


@dataclass(frozen=True)
class StepInfo:
    """Where training stands at a micro-step (``samples_seen``: all workers, estimated from
    this worker's rows between the exact once-per-epoch sums)."""

    epoch: int
    step: int
    total_steps: int
    samples_seen: int

    @property
    def progress(self) -> float:
        return self.step / max(self.total_steps, 1)


class Task(ABC):
    """One kind of model the training engine trains (module docstring)."""

    #: the Ray Data datasets this task reads with ``batches`` (split across workers)
    train_splits: tuple[str, ...] = ("train",)
    #: the log line's prefix
    log_name: str = "raycmr"

    def __init__(self, cfg: Config, params: dict[str, Any]) -> None:
        self.cfg = cfg
        self.params = params

    @abstractmethod
    def build_module(self) -> nn.Module: ...

    def optimizer_groups(self, module: nn.Module) -> list[Any]:
        """What the optimizer updates: ``module``'s trainable parameters (default), or param
        groups (dicts with their own ``lr``, scaled by the LR schedule like the rest)."""
        return [p for p in module.parameters() if p.requires_grad]

    def setup(self, shards: dict[str, Any], seed: int) -> None:
        """Per-worker preparation after restore (default: nothing)."""

    def batches(self, shards: dict[str, Any], epoch: int, seed: int
                ) -> Iterator[tuple[Batch, collections.Counter[str]]]:
        """This worker's micro-batches of the epoch (default: full batches of the ``train``
        stream, locally shuffled; tasks with other streams override it)."""
        from raycmr.data.pipeline import iter_worker_batches

        return iter_worker_batches(shards["train"], self.cfg.train.batch_size,
                                   shuffle_buffer=self.cfg.data.shuffle_buffer,
                                   seed=seed + epoch * 1000, drop_last=True,
                                   prefetch_batches=self.cfg.data.prefetch_batches)

    @abstractmethod
    def forward(self, engine: Any, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]: ...

    def backward(self, engine: Any, out: dict[str, torch.Tensor]) -> None:
        """The backward of :meth:`forward`'s ``out["loss"]`` (default: DeepSpeed's)."""
        engine.backward(out["loss"])

    @abstractmethod
    def rows(self, batch: Batch) -> int: ...

    @abstractmethod
    def validate(self, module: nn.Module, shard_map: ShardMap) -> dict[str, float]: ...

    @abstractmethod
    def export(self, module: nn.Module
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]: ...

    def first_epoch(self, state: dict[str, Any]) -> int:
        """The epoch to start at, from a restored checkpoint's client state ({} when fresh)."""
        return int(state.get("epoch", 0))

    def client_state(self, run_epoch: int) -> dict[str, Any]:
        """Extra client state saved with the checkpoint after ``run_epoch`` epochs of this run."""
        return {}

    def epoch_metrics(self, run_epoch: int) -> dict[str, Any]:
        """Extra metrics of the report after ``run_epoch`` epochs of this run."""
        return {}


def state_dict_fp32(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU float32 copy of ``module``'s state dict (call inside ZeRO-3's parameter gather)."""
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def validate_retrieval(encoder: nn.Module, shard_map: ShardMap) -> dict[str, float]:
    """``val_*``: R@K both ways (and mAP when labels exist) of ``encoder.retrieval_embed`` over
    the whole validation set, each worker embedding its share (rank 0 returns the metrics)."""
    from raycmr.evaluate.summary import evaluate_embeddings

    def embed(batch: Batch) -> dict[str, torch.Tensor]:
        img, txt = encoder.retrieval_embed(batch)
        return {"img": img.float().cpu(), "txt": txt.float().cpu(),
                "group": batch["group"].cpu(), "label": batch["label"].cpu()}

    parts = shard_map(embed)
    if not parts:
        return {}
    emb = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
    if emb["img"].shape[0] == 0:
        return {}
    return {f"val_{k}": v for k, v in evaluate_embeddings(emb).items()}
