"""The DCKT task: one round of progressive transfer (:mod:`raycmr.train.dckt.rounds` drives
the rounds).

Module: :class:`~raycmr.train.dckt.objective.DCKTObjective` (source and target branches, shared
layers, MMD links). Each micro-batch pairs one batch of the ``source`` stream with one batch of
the round's selected ``target`` pairs. An epoch is a pass over the source (the engine runs the
step count the driver fixed from the source rows). The target split is small by construction
(DCKT's target domain): each worker reads its part once per round into memory and cycles over
it, reshuffled every pass (a pass drops its last partial batch so that no pair appears twice in
a batch); so the target never runs out. Validation: retrieval with the target model, as the
dual encoder task.

``params`` (from the driver): ``round``, ``epochs_before`` (source passes of earlier rounds),
``mmd_weight`` (0 in round 0), ``source_classes``, ``target_pairs`` (selected this round).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from raycmr import distributed
from raycmr.data.pipeline import iter_worker_batches
from raycmr.train.dckt.objective import DCKTObjective
from raycmr.train.task import (
    Batch,
    ShardMap,
    StepInfo,
    Task,
    state_dict_fp32,
    validate_retrieval,
)

SOURCE_MODEL_FILE = "source_model.pt"


class TargetCycler:
    """Endless fixed-size batches from an in-memory set of rows: a fresh random permutation per
    pass, ``min(batch_size, n)`` rows per batch, the partial tail of each pass dropped."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int):
        self.rows = rows
        self.n = int(rows["group"].shape[0]) if rows else 0
        self.batch = min(int(batch_size), self.n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.zeros(0, dtype=torch.long)
        self.pos = 0
        self.passes = 0

    def next(self) -> dict[str, torch.Tensor]:
        if self.pos + self.batch > self.perm.numel():
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
            self.passes += 1
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {k: v[idx] for k, v in self.rows.items()}


def load_rows(shard) -> tuple[dict[str, torch.Tensor], collections.Counter[str]]:
    """Every valid row of a (small) dataset shard, concatenated, and invalid rows by reason."""
    parts: list[dict[str, torch.Tensor]] = []
    dropped: collections.Counter[str] = collections.Counter()
    for batch, bad in iter_worker_batches(shard, 1024, shuffle_buffer=0, seed=0,
                                          drop_last=False):
        parts.append(batch)
        dropped.update(bad)
    if not parts:
        return {}, dropped
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, dropped


class DCKTTask(Task):
    train_splits = ("source", "target")
    log_name = "raycmr dckt"

    def __init__(self, cfg, params: dict[str, Any]) -> None:
        super().__init__(cfg, params)
        self.round = int(params["round"])
        self.epochs_before = int(params["epochs_before"])
        self.target: TargetCycler | None = None
        self.dropped_target = 0

    def build_module(self) -> nn.Module:
        return DCKTObjective(self.cfg, int(self.params["source_classes"]))

    def setup(self, shards: dict[str, Any], seed: int) -> None:
        rows, dropped = load_rows(shards["target"])
        n = int(rows["group"].shape[0]) if rows else 0
        counts = distributed.gather_objects((n, sum(dropped.values())))
        least = min(c[0] for c in counts)
        if least < 2:
            raise ValueError(
                f"DCKT round {self.round}: a worker holds {least} valid target pairs; the MMD "
                "needs >= 2 per worker: select more target pairs or use fewer workers")
        self.dropped_target = sum(c[1] for c in counts)
        self.target = TargetCycler(rows, self.cfg.train.batch_size, seed)

    def batches(self, shards: dict[str, Any], epoch: int, seed: int
                ) -> Iterator[tuple[Batch, collections.Counter[str]]]:
        assert self.target is not None, "setup() first"
        source = iter_worker_batches(
            shards["source"], self.cfg.train.batch_size, shuffle_buffer=self.cfg.data.shuffle_buffer,
            seed=seed + 7919 * (self.epochs_before + epoch), drop_last=True)
        for batch, bad in source:
            yield {"source": batch, "target": self.target.next()}, bad

    def forward(self, engine: Any, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        return engine(batch["source"], batch["target"],
                      mmd_weight=float(self.params["mmd_weight"]))

    def rows(self, batch: Batch) -> int:
        return int(batch["source"]["group"].shape[0]) + int(batch["target"]["group"].shape[0])

    def validate(self, module: nn.Module, shard_map: ShardMap) -> dict[str, float]:
        return validate_retrieval(module.encoder, shard_map)

    def export(self, module: nn.Module):
        """The target model as ``model.pt`` (a plain DualEncoder for ``raycmr eval``/serving) and
        the source model as ``source_model.pt`` (:func:`raycmr.train.dckt.rounds.load_source_model`)."""
        source = {k: v.detach().float().cpu().clone()
                  for k, v in module.source_state_dict().items()}
        return state_dict_fp32(module.encoder), {SOURCE_MODEL_FILE: source}

    def first_epoch(self, state: dict[str, Any]) -> int:
        same_round = int(state.get("round", -1)) == self.round
        return int(state.get("round_epoch", 0)) if same_round else 0

    def client_state(self, run_epoch: int) -> dict[str, Any]:
        return {"round": self.round, "round_epoch": run_epoch}

    def epoch_metrics(self, run_epoch: int) -> dict[str, Any]:
        return {"round": self.round, "round_epoch": run_epoch, "target_pairs": int(self.params["target_pairs"]),
                "target_passes": self.target.passes if self.target else 0,
                "dropped_target_records": self.dropped_target}
