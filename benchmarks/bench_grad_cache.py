"""GradCache (``train.embed_chunk``): a training step's peak memory against the chunk size, the
same batch and the same step.

Each setting runs in its own process (one gloo rank, the real DeepSpeed engine and the loop's
``train_step``: forward, the task's backward, ``engine.step()``) on the same fixed batch:
transformer towers (a ViT on 32-px images and a BERT on 32 tokens, random init, whose
activations grow with rows x tokens and dwarf their parameters) or feature MLPs (``--towers
mlp``: activations about the size of the parameters' gradients). After one warm-up step (optimizer states
allocated) the peak resident memory is reset (``VmHWM`` through ``/proc/self/clear_refs``;
glibc's mmap threshold at 64 KiB so that freed tensors leave RSS at once); the figure is what
the measured steps add to the resident memory before them: the encoders' activations (all rows,
or one chunk's), the embeddings and the loss. Also per setting: the step's wall and CPU time
(medians) and the largest difference of the parameters after the steps from the unchunked
run's (the same step: float32 rounding only).

    python benchmarks/bench_grad_cache.py                      # transformers, off, 256 ... 16
    python benchmarks/bench_grad_cache.py --towers mlp --rows 1024 --chunks 0 1024 512 256 128 64 \
        --out bench_grad_cache_mlp
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:  # `python -m benchmarks.bench_grad_cache` from the repo root
    from benchmarks.bench_loss_scaling import _rss_kb
    from benchmarks.common import print_table, write_result
    from benchmarks.raybench import med
except ImportError:  # `python benchmarks/bench_grad_cache.py`
    from bench_loss_scaling import _rss_kb
    from common import print_table, write_result
    from raybench import med

from raycmr.distributed import end_spawned_process

NAME = "bench_grad_cache"
IMAGE, TOKENS, VOCAB = 32, 32, 1000  # transformer towers: 32-px images (64 patches), 32 tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", default="transformer", choices=["transformer", "mlp"],
                   help="transformer: ViT + BERT (random init) on 32-px images and 32 tokens; "
                        "mlp: feature MLPs")
    p.add_argument("--rows", type=int, default=256, help="the batch (one worker)")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 128, 64, 32, 16],
                   help="train.embed_chunk values; 0 = unchunked")
    p.add_argument("--width", type=int, default=64, help="transformer hidden size")
    p.add_argument("--layers", type=int, default=4, help="transformer layers per tower")
    p.add_argument("--input-dim", type=int, default=512, help="mlp input size")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024, 1024, 1024],
                   help="mlp hidden sizes")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="> 0: the chunks draw other masks than one pass, so the step differs")
    p.add_argument("--loss", default="infonce", choices=["vse_mh", "vse_sh", "infonce"])
    # DeepSpeed's WarmupCosineLR gives the first two steps the learning rate 0: with the
    # warm-up step, 2 measured steps make the last one move the parameters
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=NAME)
    return p.parse_args(argv)


def _towers(args: argparse.Namespace) -> list[str]:
    if args.towers == "mlp":
        hidden = "[" + ",".join(map(str, args.hidden)) + "]"
        keys = ("kind=mlp", f"input_dim={args.input_dim}", f"hidden_dims={hidden}",
                f"dropout={args.dropout}")
        return ["data.kind=features", *(f"model.{t}.{k}" for t in ("image", "text") for k in keys)]
    from raycmr.configs.tiny import HF_TOWERS

    size = (f"hidden_size: {args.width}, num_hidden_layers: {args.layers}, num_attention_heads: "
            f"{max(args.width // 32, 1)}, intermediate_size: {4 * args.width}, "
            f"hidden_dropout_prob: {args.dropout}, attention_probs_dropout_prob: {args.dropout}")
    return ["data.kind=images", f"data.image_size={IMAGE}", f"data.max_text_len={TOKENS}",
            *HF_TOWERS,
            f"model.image.hf_config={{model_type: vit, image_size: {IMAGE}, patch_size: 4, {size}}}",
            (f"model.text.hf_config={{model_type: bert, vocab_size: {VOCAB}, "
             f"max_position_embeddings: {TOKENS}, {size}}}")]


def _batch(args: dict[str, Any], rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {"group": torch.arange(rows), "label": torch.zeros(rows, dtype=torch.long)}
    if args["towers"] == "mlp":
        dim = args["input_dim"]
        return {**batch, "image_feat": torch.randn(rows, dim, generator=g),
                "text_feat": torch.randn(rows, dim, generator=g)}
    return {**batch, "pixel_values": torch.randn(rows, 3, IMAGE, IMAGE, generator=g),
            "input_ids": torch.randint(0, VOCAB, (rows, TOKENS), generator=g),
            "attention_mask": torch.ones(rows, TOKENS, dtype=torch.long)}


def _overrides(args: argparse.Namespace, chunk: int) -> list[str]:
    return [*_towers(args), f"model.embed_dim={args.embed_dim}",
            f"loss.kind={args.loss}", f"train.batch_size={args.rows}", "train.precision=fp32",
            "train.zero_stage=0", "train.warmup_steps=1", f"train.embed_chunk={chunk}"]


def _worker(rank: int, job: dict[str, Any], out_path: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(job["threads"])
    dist.init_process_group("gloo", init_method=f"file://{out_path}.rendezvous", rank=0,
                            world_size=1)
    try:
        from raycmr.config import load_config
        from raycmr.train.loop import build_engine, train_step
        from raycmr.train.registry import make_task
        from raycmr.train.task import StepInfo

        cfg = load_config(None, job["overrides"])
        torch.manual_seed(0)
        task = make_task("dual_encoder", cfg)
        engine = build_engine(task, cfg, total_steps=job["steps"] + 10)
        batch = _batch(job, job["rows"])

        def step() -> float:
            out = train_step(engine, task, batch, StepInfo(0, engine.global_steps, 10, 0))
            return float(out["loss"].detach())

        step()  # warm-up: optimizer states, first-call paths
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _rss_kb("VmRSS")
        walls, cpus, losses = [], [], []
        for _ in range(job["steps"]):
            w0, c0 = time.perf_counter(), time.process_time()
            losses.append(step())
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        torch.save({"peak_mb": (_rss_kb("VmHWM") - base) / 1024, "wall": walls, "cpu": cpus,
                    "losses": losses, "base_mb": base / 1024,
                    "params": torch.cat([p.detach().flatten()
                                         for p in engine.module.parameters()])}, out_path)
    finally:
        dist.destroy_process_group()
    end_spawned_process()


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One setting in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.pt")
        mp.start_processes(_worker, args=(job, path), nprocs=1, join=True,
                           start_method="spawn")
        return torch.load(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # tensors above 64 KiB get their own mapping and leave RSS when freed: VmHWM tracks them
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows, reference = [], None
    for chunk in args.chunks:
        job = {"overrides": _overrides(args, chunk), "rows": args.rows, "steps": args.steps,
               "towers": args.towers, "input_dim": args.input_dim, "threads": args.threads}
        got = measure(job)
        if reference is None:
            reference = got
        rows.append({
            "embed_chunk": chunk or "off", "chunks": -(-args.rows // chunk) if chunk else 1,
            "peak_mb": got["peak_mb"], "x_off": got["peak_mb"] / reference["peak_mb"],
            "wall_ms": 1e3 * med(got["wall"]), "cpu_ms": 1e3 * med(got["cpu"]),
            "max_param_diff": float((got["params"] - reference["params"]).abs().max()),
            "loss": got["losses"][-1], "base_mb": got["base_mb"]})
        print(f"embed_chunk={chunk}: step peak +{rows[-1]['peak_mb']:.1f} MB, "
              f"cpu {rows[-1]['cpu_ms']:.0f} ms", flush=True)
        write_result(args.out, rows, {**vars(args), "partial": True})  # kept if stopped early
    towers = (f"MLP towers {args.input_dim}->{args.hidden}->{args.embed_dim}"
              if args.towers == "mlp" else
              f"ViT ({IMAGE} px, 64 patches) + BERT ({TOKENS} tokens), {args.layers} layers of "
              f"width {args.width} each")
    title = (f"one training step, {args.rows} rows, {towers}, dropout {args.dropout}, "
             f"{args.loss}, fp32, "
             f"1 worker, {args.threads} threads; peak = resident memory the step adds; "
             f"medians of {args.steps} steps (shared machine)")
    columns = ["embed_chunk", "chunks", "peak_mb", "x_off", "cpu_ms", "wall_ms",
               "max_param_diff", "loss"]
    if reference is not None and args.chunks[0] != 0:
        print("note: the first setting is the reference of x_off and max_param_diff")
    text = print_table(rows, columns, title=title,
                       formats={"peak_mb": ".1f", "x_off": ".2f", "cpu_ms": ".0f",
                                "wall_ms": ".0f", "max_param_diff": ".1e", "loss": ".6f"})
    meta = dict(vars(args))
    meta["title"] = text.splitlines()[0]
    path = write_result(args.out, rows, meta)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
