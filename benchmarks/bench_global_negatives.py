"""Global negatives side by side: training step time with and without the cross-worker gather.

With ``loss.global_negatives=true`` every worker all-gathers the image and text embeddings, group
ids and row counts of all workers in one packed collective and computes the loss of the whole
global batch (W*B anchors x W*B candidates), so that the backward needs no collective
(``raycmr.distributed``). This measures what that costs at 2 workers.

Default (and ``--small``): a 2-process gloo harness around ``CrossModalObjective``, like
``tests/test_gather_equivalence.py``: each process runs forward + backward + a flat all-reduce of
the gradients (what DDP / DeepSpeed do, one bucket), then a torch AdamW step, with ``--threads``
torch threads. The switch is flipped between blocks of ``--block`` steps in the same processes
(on-off, off-on, ...), so both arms share the same processes, caches and neighbours. Times are
medians over steps; the ratios are medians over rounds of (median on-step / median off-step of
that round's two adjacent blocks), which a slow spell of a shared machine tilts less than a ratio
of overall medians. The number of torch.distributed collectives per step is counted too.
Configurations: the quickstart model (tiny ViT + tiny BERT) at its batch of 64
per worker, and the Wikipedia-style feature MLPs, where the encoders are cheap and the gather is
the largest share of the step.

``--trainer``: two real 2-worker ``raycmr train`` runs per round on a local Ray instance (Ray
Train + DeepSpeed + Ray Data), flag on then off (off then on in the next round), samples/s of
epochs 2.. from the reported metrics. It takes minutes per run on 2 cores, and the difference it
is after is smaller than run-to-run noise on a shared machine, hence not the default.

    python benchmarks/bench_global_negatives.py --small
    python benchmarks/bench_global_negatives.py --trainer --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

try:  # `python -m benchmarks.bench_global_negatives` from the repo root
    from benchmarks.common import parse_bench_args, print_table, save_run
    from benchmarks.raybench import med, spread
    from benchmarks.spawned import gloo_rank, run_spawned
except ImportError:  # `python benchmarks/bench_global_negatives.py`
    from common import parse_bench_args, print_table, save_run
    from raybench import med, spread
    from spawned import gloo_rank, run_spawned

from raycmr.config import load_config
from raycmr.train.dual_encoder.objective import CrossModalObjective

NAME = "bench_global_negatives"

FEATURES = [  # the wikipedia config's towers (128-d image, 10-d text features), no DSCMR
    "data.kind=features", "model.embed_dim=64", "model.shared_layers=1",
    "model.image.kind=mlp", "model.image.input_dim=128", "model.image.hidden_dims=[512]",
    "model.text.kind=mlp", "model.text.input_dim=10", "model.text.hidden_dims=[512]",
]
MODELS = {"quickstart": ("quickstart", []), "features": (None, FEATURES)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true",
                   help="harness: quickstart@64 (6 rounds of 2+2 steps), features@64 and @512")
    p.add_argument("--configs", nargs="+", default=["quickstart:64", "features:64",
                                                    "features:512", "features:2048"],
                   help="MODEL:BATCH_PER_WORKER, MODEL in quickstart, features")
    p.add_argument("--rounds", type=int, default=8, help="on/off block pairs per config")
    p.add_argument("--block", type=int, default=5, help="steps per block (quickstart)")
    p.add_argument("--feature-block", type=int, default=40, help="steps per block (features)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--loss", default="vse_mh", choices=["vse_mh", "vse_sh", "infonce"])
    p.add_argument("--trainer", action="store_true",
                   help="real 2-worker raycmr train runs instead of the harness")
    p.add_argument("--rows", type=int, default=2048, help="--trainer: training rows per epoch")
    p.add_argument("--epochs", type=int, default=3, help="--trainer: epochs per run (>= 2)")
    return parse_bench_args(p, argv, NAME, small={
        "configs": ["quickstart:64", "features:64", "features:512"], "rounds": 6, "block": 2,
        "feature_block": 20})


# ------------------------------------------------------------------------------------ harness


def _batch(model: str, cfg, batch: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    out = {"group": torch.arange(batch) + rank * batch,
           "label": torch.zeros(batch, dtype=torch.long)}
    if model == "features":
        out["image_feat"] = torch.randn(batch, cfg.model.image.input_dim, generator=g)
        out["text_feat"] = torch.randn(batch, cfg.model.text.input_dim, generator=g)
    else:
        size, length = cfg.data.image_size, cfg.data.max_text_len
        out["pixel_values"] = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        out["input_ids"] = torch.randint(1000, 30000, (batch, length), generator=g)
        out["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    return out


def _worker(rank: int, world: int, port: int, job: dict[str, Any], out_path: str) -> None:
    with gloo_rank(rank, world, port, job["threads"]):
        name, overrides = MODELS[job["model"]]
        cfg = load_config(name, overrides + [f"loss.kind={job['loss']}",
                                             f"train.batch_size={job['batch']}"])
        torch.manual_seed(job["seed"])
        model = CrossModalObjective(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = _batch(job["model"], cfg, job["batch"], rank)
        params = [p for p in model.parameters() if p.requires_grad]

        def step(global_negatives: bool) -> tuple[float, float]:
            model.cfg.loss.global_negatives = global_negatives
            dist.barrier()
            start = time.perf_counter()
            out = model(batch)
            opt.zero_grad(set_to_none=False)
            out["loss"].backward()
            grads = [p.grad for p in params if p.grad is not None]  # e.g. unused pooler
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= world
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
            mid = time.perf_counter()
            opt.step()
            return mid - start, time.perf_counter() - start

        for mode in (True, False, True, False):  # warm-up: allocator, first-call paths
            step(mode)
        collectives = {mode: count_collectives(lambda m=mode: step(m)) for mode in (True, False)}
        records = []
        for r in range(job["rounds"]):
            for mode in ((True, False) if r % 2 == 0 else (False, True)):
                for _ in range(job["block"]):
                    fwd_bwd_comm, full = step(mode)
                    records.append({"round": r, "global": mode,
                                    "fwd_bwd_comm_s": fwd_bwd_comm, "step_s": full})
        if rank == 0:
            Path(out_path).write_text(json.dumps({"records": records, "collectives": {
                "on": collectives[True], "off": collectives[False]}}))


def count_collectives(fn) -> int:
    """Calls of torch.distributed collectives (all_gather, all_reduce, ...) made by ``fn()``."""
    names = ("all_gather", "all_reduce", "all_gather_object", "broadcast", "reduce_scatter",
             "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all")
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    calls = [0]

    def wrap(original):
        def counted(*a, **kw):
            calls[0] += 1
            return original(*a, **kw)
        return counted

    try:
        for n, original in originals.items():
            setattr(dist, n, wrap(original))
        fn()
    finally:
        for n, original in originals.items():
            setattr(dist, n, original)
    return calls[0]


def run_harness(job: dict[str, Any]) -> dict[str, Any]:
    return run_spawned(_worker, 2, job)


def paired_ratios(records: list[dict[str, Any]], key: str) -> list[float]:
    """Per round: median of its on-steps / median of its off-steps (adjacent blocks), so that a
    slow spell of the machine that spans one round does not tilt the comparison."""
    ratios = []
    for r in sorted({rec["round"] for rec in records}):
        on = [rec[key] for rec in records if rec["round"] == r and rec["global"]]
        off = [rec[key] for rec in records if rec["round"] == r and not rec["global"]]
        ratios.append(med(on) / med(off))
    return ratios


def harness_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows, raw = [], {}
    for spec in args.configs:
        model, _, batch = spec.partition(":")
        if model not in MODELS or not batch.isdigit():
            raise SystemExit(f"--configs entry '{spec}' must be MODEL:BATCH with MODEL in "
                             f"{', '.join(MODELS)}")
        job = {"model": model, "batch": int(batch), "threads": args.threads, "loss": args.loss,
               "seed": args.seed, "rounds": args.rounds,
               "block": args.block if model == "quickstart" else args.feature_block}
        print(f"harness: {model} model, batch {batch}/worker x 2 workers, "
              f"{args.rounds} rounds x 2 blocks x {job['block']} steps", flush=True)
        result = run_harness(job)
        records = result["records"]
        raw[spec] = result
        on = [r for r in records if r["global"]]
        off = [r for r in records if not r["global"]]
        t_on, t_off = med([r["fwd_bwd_comm_s"] for r in on]), \
            med([r["fwd_bwd_comm_s"] for r in off])
        s_on, s_off = med([r["step_s"] for r in on]), med([r["step_s"] for r in off])
        paired = paired_ratios(records, "step_s")
        rows.append({
            "model": model, "batch_per_worker": int(batch), "negatives_on": 2 * int(batch) - 1,
            "negatives_off": int(batch) - 1,
            "fbc_ms_off": 1e3 * t_off, "fbc_ms_on": 1e3 * t_on,
            "delta_ms": 1e3 * (t_on - t_off),
            "fbc_on_over_off": med(paired_ratios(records, "fwd_bwd_comm_s")),
            "step_ms_off": 1e3 * s_off, "step_ms_on": 1e3 * s_on,
            "step_on_over_off": med(paired),
            "paired_spread": spread(paired),
            "spread_ms_on": spread([1e3 * r["step_s"] for r in on]),
            "collectives_off": result["collectives"]["off"],
            "collectives_on": result["collectives"]["on"],
            "steps_each": len(on),
        })
    return rows, raw


# ------------------------------------------------------------------------------------ trainer


def trainer_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        from benchmarks.raybench import (
            fit_with_epoch_metrics,
            start_local_ray,
            synthetic_shards,
            tiny_run_overrides,
        )
    except ImportError:
        from raybench import (
            fit_with_epoch_metrics,
            start_local_ray,
            synthetic_shards,
            tiny_run_overrides,
        )

    shards = synthetic_shards(args.rows, 64, rows_per_shard=max(args.rows // 8, 64),
                              seed=args.seed)
    start_local_ray(max(os.cpu_count() or 1, 2 + 2))
    rates: dict[bool, list[float]] = {True: [], False: []}
    runs = []
    for r in range(args.rounds):
        for mode in ((True, False) if r % 2 == 0 else (False, True)):
            cfg = load_config("quickstart", tiny_run_overrides(
                shards, workers=2, batch=64, epochs=args.epochs, threads=args.threads)
                + [f"loss.global_negatives={str(mode).lower()}", f"loss.kind={args.loss}"])
            start = time.perf_counter()
            _, epochs = fit_with_epoch_metrics(cfg)
            steady = [float(e["samples_per_s"]) for e in epochs if int(e["epoch"]) >= 2]
            rates[mode] += steady
            runs.append({"global": mode, "wall_s": time.perf_counter() - start,
                         "epochs": epochs})
            print(f"  global_negatives={mode}: samples/s of epochs 2.. {steady}", flush=True)
    rows = []
    for mode in (False, True):
        rows.append({"global_negatives": mode, "epochs": len(rates[mode]),
                     "samples_per_s": med(rates[mode]), "spread": spread(rates[mode]),
                     "step_ms": 1e3 * 128 / med(rates[mode]),
                     "on_over_off_time": med(rates[False]) / med(rates[True])})
    return rows, {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trainer:
        rows, raw = trainer_rows(args)
        columns = ["global_negatives", "epochs", "samples_per_s", "spread", "step_ms",
                   "on_over_off_time"]
        title = (f"global negatives, real 2-worker raycmr train runs (quickstart model, batch 64"
                 f"/worker, {args.threads} thread(s)/worker), samples/s of epochs 2..")
        ratio = rows[0]["on_over_off_time"]
        summary = [f"step time with the gather / without, real trainer: {ratio:.3f}"]
        method = "trainer"
    else:
        rows, raw = harness_rows(args)
        columns = ["model", "batch_per_worker", "negatives_off", "negatives_on", "fbc_ms_off",
                   "fbc_ms_on", "delta_ms", "fbc_on_over_off", "step_ms_off", "step_ms_on",
                   "step_on_over_off", "paired_spread", "collectives_off", "collectives_on"]
        title = (f"global negatives at 2 workers, gloo harness around CrossModalObjective, "
                 f"{args.loss}, {args.threads} thread(s)/process; fbc = forward + backward + "
                 "gradient all-reduce, step = fbc + AdamW; medians, ratios paired by round")
        summary = [
            f"{r['model']}@{r['batch_per_worker']}/worker: step with gather / without = "
            f"{r['step_on_over_off']:.3f} ({r['delta_ms']:+.1f} ms on "
            f"{r['step_ms_off']:.0f} ms)" for r in rows]
        summary.append(
            f"torch.distributed collectives per step: {rows[0]['collectives_off']} without the "
            f"gather (the gradient all-reduce), {rows[0]['collectives_on']} with it (the one "
            "packed gather of embeddings, groups and sizes)")
        summary.append(
            "what the gather adds beyond its one collective is the loss itself: every worker "
            "scores all W*B anchors against all W*B candidates, (W*B)^2 pairs instead of B^2 "
            "(exact gradients with no backward collective); for the feature MLPs the loss is "
            "most of the step, so its ratio follows the pair count, for the quickstart towers "
            "it is noise")
        method = "harness"
    formats = {"fbc_on_over_off": ".3f", "step_on_over_off": ".3f", "on_over_off_time": ".3f",
               "delta_ms": "+.1f", "fbc_ms_off": ".1f", "fbc_ms_on": ".1f",
               "step_ms_off": ".1f", "step_ms_on": ".1f", "samples_per_s": ".1f",
               "step_ms": ".0f"}
    print()
    text = print_table(rows, columns, title=title, formats=formats)
    print("\n" + "\n".join(summary))
    return save_run(args, rows, {
        "title": text.splitlines()[0], "summary": summary, "columns": columns,
        "formats": formats, "method": method, "raw": raw,
        "timing": "on/off blocks alternated (ABBA) in the same processes; medians"
        if method == "harness" else "runs alternated on/off, off/on; medians"})


if __name__ == "__main__":
    sys.exit(main())
