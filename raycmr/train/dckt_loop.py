"""The per-worker loop of one DCKT round: a DeepSpeed engine over :class:`DCKTObjective`, fed by
two Ray Data streams (``source`` and the round's selected ``target`` pairs, both split across
workers), one source batch + one target batch per micro-step.

Step alignment: an epoch is a pass over the source; every worker runs exactly
``per_epoch * grad_accum`` micro-steps (fixed on the driver from the source row count), and
before each micro-step the workers agree (all-reduce MIN of "I have a batch") that all of them
still have a source batch, so DeepSpeed's gradient all-reduce and the gathered contrastive loss
always line up. The target split is small by construction (DCKT's target domain): each worker
reads its part once per round into memory and cycles over it, reshuffled every pass (a pass
drops its last partial batch so that no pair appears twice in a batch); so the target never
"runs out" and re-reading it never waits on the other workers' data iterators.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch
import torch.distributed as dist

from raycmr import artifacts, distributed
from raycmr.config import Config, config_from_dict
from raycmr.data.pipeline import iter_worker_batches
from raycmr.train import checkpoint as ckpt
from raycmr.train.dckt_objective import DCKTObjective
from raycmr.train.deepspeed_config import deepspeed_config
from raycmr.train.loop import _restore, _to_device, validate

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


def _reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """All-reduce a few numbers (on the engine's device, so that NCCL accepts the tensor)."""
    if distributed.world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu().tolist()]


def export_state_dicts(engine, cfg: Config):
    """``(target encoder, source model)`` fp32 state dicts on rank 0 (``(None, None)`` elsewhere);
    ZeRO-3 parameters are gathered from all ranks first."""
    module = engine.module
    gather = contextlib.nullcontext()
    if cfg.train.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    with gather:
        if distributed.rank() != 0:
            return None, None
        enc = {k: v.detach().float().cpu().clone() for k, v in module.encoder.state_dict().items()}
        src = {k: v.detach().float().cpu().clone() for k, v in module.source_state_dict().items()}
    return enc, src


def report_with_checkpoint(engine, cfg: Config, metrics: dict[str, Any],
                           client_state: dict[str, Any]) -> None:
    """DeepSpeed state (``ds/``) + the target model (``model.pt``, a plain DualEncoder for
    ``raycmr eval``/serving) + the source model (``source_model.pt``) + config + state."""
    enc, src = export_state_dicts(engine, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(os.path.join(tmp, ckpt.DS_DIR), tag=ckpt.DS_TAG,
                               client_state=client_state)
        if enc is not None:
            artifacts.write_export(tmp, enc, cfg,
                                   {**client_state, "step": engine.global_steps, "metrics": metrics})
            torch.save(src, os.path.join(tmp, SOURCE_MODEL_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def dckt_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One round. ``loop_config``: ``cfg`` (dict), ``round``, ``epochs`` (this round),
    ``epochs_before`` (earlier rounds), ``per_epoch`` (optimizer steps per source pass),
    ``total_steps`` (all rounds: the LR schedule spans the whole run), ``mmd_weight``,
    ``source_classes``, ``target_pairs`` (selected this round)."""
    import deepspeed

    cfg = config_from_dict(loop_config["cfg"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    round_idx, epochs = int(loop_config["round"]), int(loop_config["epochs"])
    epochs_before, per_epoch = int(loop_config["epochs_before"]), int(loop_config["per_epoch"])
    total_steps, w_mmd = int(loop_config["total_steps"]), float(loop_config["mmd_weight"])
    world, rank = distributed.world_size(), distributed.rank()
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    seed = cfg.train.seed + 1000 * round_idx + rank
    torch.manual_seed(seed)
    np.random.seed(seed)

    model = DCKTObjective(cfg, int(loop_config["source_classes"]))
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=deepspeed_config(cfg, total_steps),
        dist_init_required=False,
    )
    device = engine.device
    dtype = next(engine.module.parameters()).dtype

    state = _restore(engine, cfg)  # Ray Train's checkpoint (worker failure) or the last round's
    same_round = int(state.get("round", -1)) == round_idx
    start_epoch = int(state.get("round_epoch", 0)) if same_round else 0
    samples_seen = int(state.get("samples_seen", 0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    if rank == 0 and state:
        print(f"[raycmr dckt] round {round_idx}: starting at round epoch {start_epoch}, "
              f"step {engine.global_steps}", flush=True)

    source_shard = ray.train.get_dataset_shard("source")
    try:
        val_shard = ray.train.get_dataset_shard("val")
    except KeyError:  # no data.val (Train V2 raises instead of returning None)
        val_shard = None
    rows, dropped_target = load_rows(ray.train.get_dataset_shard("target"))
    n_target = int(rows["group"].shape[0]) if rows else 0
    least_target = _reduce([n_target], device, "min")[0]
    if least_target < 2:
        raise ValueError(
            f"DCKT round {round_idx}: a worker holds {int(least_target)} valid target pairs; the "
            f"MMD needs >= 2 per worker: select more target pairs or use fewer workers"
        )
    dropped_target_all = int(_reduce([sum(dropped_target.values())], device)[0])
    target = TargetCycler(rows, cfg.train.batch_size, seed)
    micro_per_epoch = per_epoch * cfg.train.grad_accum

    for epoch in range(start_epoch, epochs):
        engine.train()
        sums: collections.defaultdict[str, float] = collections.defaultdict(float)
        n_logged, local_rows, epoch_start = 0, 0, time.time()
        dropped: collections.Counter[str] = collections.Counter()
        batches = iter_worker_batches(
            source_shard, cfg.train.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=seed + 7919 * (epochs_before + epoch), drop_last=True,
        )
        # a worker whose source pass ends early stops every worker (distributed.while_all_have)
        for micro, (src_batch, bad) in zip(range(micro_per_epoch),
                                           distributed.while_all_have(batches)):
            dropped.update(bad)
            tgt_batch = target.next()
            out = engine(_to_device(src_batch, device, dtype), _to_device(tgt_batch, device, dtype),
                         mmd_weight=w_mmd)
            engine.backward(out["loss"])
            engine.step()
            local_rows += int(src_batch["group"].shape[0]) + int(tgt_batch["group"].shape[0])
            for k, v in out.items():
                sums[k] += float(v.detach())
            n_logged += 1
            if rank == 0 and (micro + 1) % cfg.train.grad_accum == 0 \
                    and engine.global_steps % cfg.train.log_every == 0:
                line = {k: round(float(v.detach()), 4) for k, v in out.items()}
                print(f"[raycmr dckt] round {round_idx} epoch {epochs_before + epoch + 1} step "
                      f"{engine.global_steps}/{total_steps} lr {engine.get_lr()[0]:.2e} {line}",
                      flush=True)

        keys = sorted(sums)
        reduced = _reduce([sums[k] / max(n_logged, 1) for k in keys]
                          + [local_rows, sum(dropped.values())], device)
        samples_seen += int(reduced[-2])
        metrics: dict[str, Any] = {f"train_{k}": v / world for k, v in zip(keys, reduced[:-2])}
        metrics.update(
            round=round_idx, round_epoch=epoch + 1, epoch=epochs_before + epoch + 1,
            step=engine.global_steps, samples_seen=samples_seen, lr=float(engine.get_lr()[0]),
            epoch_time_s=time.time() - epoch_start, target_pairs=int(loop_config["target_pairs"]),
            target_passes=target.passes, dropped_records=int(reduced[-1]),
            dropped_target_records=dropped_target_all,
        )
        metrics.update(validate(engine, val_shard, cfg, device, dtype))
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        client_state = {"round": round_idx, "round_epoch": epoch + 1,
                        "samples_seen": samples_seen, "history": history}
        last = epoch + 1 == epochs
        if last or (epoch + 1) % cfg.train.checkpoint_every_epochs == 0:
            report_with_checkpoint(engine, cfg, metrics, client_state)
        else:
            ray.train.report(metrics)
