"""GPU side: training samples/s per GPU and model FLOP utilisation, FAISS GPU vs CPU search.

Meant for a machine with a CUDA GPU. Without one it prints one line starting with ``SKIPPED:``
and exits with code 0, writing no result (so a committed GPU result is not overwritten by a
CPU-only ``make bench``); ``--strict`` makes that exit code 2 instead, for CI jobs that must run
on a GPU.

1. Training throughput of ``CrossModalObjective`` on one GPU: forward + backward + fused AdamW
   step under bf16 autocast (``--precision``), batches already on the GPU (the model's ceiling,
   no data path), median of ``--repeats`` timed blocks of ``--steps`` steps after ``--warmup``.
   Models: ``quickstart`` (tiny ViT + tiny BERT, 64 px: launch-bound on any GPU) and ``base``
   (ViT-B/16 at 224 px + BERT-base, random init from configs, 512-d embeddings).
2. MFU: the FLOPs of one training step counted with ``torch.utils.flop_counter.FlopCounterMode``
   (matmuls, convolutions, attention; forward + backward), times steps/s, divided by the GPU's
   peak dense bf16 FLOP/s from ``PEAK_BF16`` (matched on the device name; ``--peak-tflops``
   overrides; unknown GPUs get no MFU).
3. Search: exact inner-product top-k over N random unit vectors, FAISS ``IndexFlatIP`` on CPU
   against FAISS on the GPU when the installed faiss has GPU support (``faiss-gpu``); otherwise
   the table says so and shows torch's exact ``matmul + topk`` on the GPU instead.

    python benchmarks/bench_gpu.py --small        # quickstart@256 + base@64, N = 100k
    python benchmarks/bench_gpu.py                # quickstart@1024 + base@256, N = 1M
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

try:  # `python -m benchmarks.bench_gpu` from the repo root
    from benchmarks.common import median_of, parse_bench_args, print_table, save_run, set_threads
except ImportError:  # `python benchmarks/bench_gpu.py`
    from common import median_of, parse_bench_args, print_table, save_run, set_threads

from raycmr.config import load_config
from raycmr.configs.tiny import HF_TOWERS
from raycmr.train.dual_encoder.objective import CrossModalObjective

NAME = "bench_gpu"
SKIPPED = "SKIPPED:"

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, from the vendors' data sheets. Order
# matters: the first key found in the device name wins.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16 on V100)
}

BASE = [  # ViT-B/16 + BERT-base shapes (random init) in place of the quickstart's towers
    "data.image_size=224", "data.max_text_len=32", "model.embed_dim=512", *HF_TOWERS,
    ("model.image.hf_config={model_type: vit, image_size: 224, patch_size: 16,"
     " num_channels: 3, hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12,"
     " intermediate_size: 3072}"),
    ("model.text.hf_config={model_type: bert, vocab_size: 30522, hidden_size: 768,"
     " num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072,"
     " max_position_embeddings: 512}"),
]
MODELS = {"quickstart": [], "base": BASE}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true",
                   help="quickstart@256 and base@64, N = 100k, fewer repeats")
    p.add_argument("--configs", nargs="+", default=["quickstart:1024", "base:256"],
                   help="MODEL:BATCH, MODEL in quickstart, base")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (median)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak dense bf16 TFLOP/s of the GPU (0 = look up the device name)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000],
                   help="search: gallery sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1,
                   help="FAISS CPU search threads")
    p.add_argument("--strict", action="store_true", help="exit 2 instead of 0 without a GPU")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run every code path on the CPU (a smoke test of this script; the "
                        "numbers mean nothing)")
    return parse_bench_args(p, argv, NAME, small={
        "configs": ["quickstart:256", "base:64"], "sizes": [100_000], "repeats": 3})


def peak_flops(name: str, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size, length = cfg.data.image_size, cfg.data.max_text_len
    out = {
        "pixel_values": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
        "input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "group": torch.arange(batch),
        "label": torch.zeros(batch, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in out.items()}


def bench_training(model_name: str, batch: int, args: argparse.Namespace,
                   device: torch.device, peak: float | None) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config("quickstart", MODELS[model_name])
    torch.manual_seed(args.seed)
    model = CrossModalObjective(cfg).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    data = synthetic_batch(cfg, batch, device)
    use_bf16 = args.precision == "bf16"

    def fwd_bwd() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(data)["loss"]
        loss.backward()
        return loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    flops = float(counter.get_total_flops())
    opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    _sync(device)

    def block() -> None:
        for _ in range(args.steps):
            step()
        _sync(device)

    seconds = median_of(block, repeats=args.repeats, warmup=0) / args.steps
    achieved = flops / seconds
    params = sum(p.numel() for p in model.parameters())
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "part": "train", "config": f"{model_name}@{batch}", "params_M": params / 1e6,
        "step_ms": 1e3 * seconds, "samples_per_s": batch / seconds,
        "gflop_per_step": flops / 1e9, "tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None, "max_mem_gib": mem,
    }


def random_unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_search(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    queries = random_unit(args.queries, args.dim, rng)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        rows += _search_rows(random_unit(n, args.dim, rng), queries, args, device)
    return rows


def _search_rows(gallery: np.ndarray, queries: np.ndarray, args: argparse.Namespace,
                 device: torch.device) -> list[dict[str, Any]]:
    import faiss

    k, n = args.k, gallery.shape[0]
    cpu = faiss.IndexFlatIP(args.dim)
    cpu.add(gallery)
    cpu_s = median_of(lambda: cpu.search(queries, k), repeats=args.repeats)
    _, ref = cpu.search(queries, k)
    base = {"part": "search", "N": n}
    rows = [{**base, "config": f"faiss IndexFlatIP, CPU x{args.cpu_threads} threads",
             "search_s": cpu_s, "qps": args.queries / cpu_s, "x_cpu": 1.0, "recall": 1.0}]
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, device.index or 0, cpu)
        gpu_s = median_of(lambda: gpu.search(queries, k), repeats=args.repeats)
        _, ids = gpu.search(queries, k)
        rows.append({**base, "config": "faiss IndexFlatIP, GPU (index_cpu_to_gpu)",
                     "search_s": gpu_s, "qps": args.queries / gpu_s, "x_cpu": cpu_s / gpu_s,
                     "recall": _recall(ids, ref, k)})
    else:
        rows.append({**base, "config": "faiss GPU: not available (this faiss build has no GPU "
                     "support; install faiss-gpu)", "search_s": None})
    g = torch.from_numpy(gallery).to(device)
    q = torch.from_numpy(queries).to(device)

    def torch_search() -> torch.Tensor:
        ids = torch.topk(q @ g.T, k, dim=1).indices
        _sync(device)
        return ids

    t_s = median_of(torch_search, repeats=args.repeats)
    rows.append({**base, "config": f"torch matmul + topk on {device.type} (exact)",
                 "search_s": t_s, "qps": args.queries / t_s, "x_cpu": cpu_s / t_s,
                 "recall": _recall(torch_search().cpu().numpy(), ref, k)})
    return rows


def _recall(ids: np.ndarray, ref: np.ndarray, k: int) -> float:
    return float(statistics.mean(len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, ref)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"{SKIPPED} bench_gpu needs a CUDA GPU and none is visible (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}); nothing measured",
              flush=True)
        return 2 if args.strict else 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    threads = set_threads(args.cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device {name}, peak bf16 {peak / 1e12 if peak else 'unknown'} TFLOP/s, "
          f"precision {args.precision}", flush=True)
    rows: list[dict[str, Any]] = []
    for spec in args.configs:
        model_name, _, batch = spec.partition(":")
        if model_name not in MODELS or not batch.isdigit():
            raise SystemExit(f"--configs entry '{spec}' must be MODEL:BATCH with MODEL in "
                             f"{', '.join(MODELS)}")
        start = time.perf_counter()
        row = bench_training(model_name, int(batch), args, device, peak)
        rows.append(row)
        print(f"  {spec}: {row['samples_per_s']:.0f} samples/s, {row['tflops']:.1f} TFLOP/s, "
              f"MFU {row['mfu'] if row['mfu'] is None else round(row['mfu'], 3)} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    search_rows = bench_search(args, device)
    print()
    train_cols = ["config", "params_M", "step_ms", "samples_per_s", "gflop_per_step", "tflops",
                  "mfu", "max_mem_gib"]
    search_cols = ["N", "config", "search_s", "qps", "x_cpu", "recall"]
    formats = {"mfu": ".3f", "params_M": ".1f", "step_ms": ".1f", "samples_per_s": ",.0f",
               "gflop_per_step": ",.1f", "tflops": ".1f", "max_mem_gib": ".1f",
               "recall": ".3f", "qps": ",.0f", "search_s": ".4f", "x_cpu": ".1f"}
    text = print_table(rows, train_cols, title=f"training on one {name}, {args.precision}, "
                       "per GPU (no data path)", formats=formats)
    print()
    print_table(search_rows, search_cols, title=f"exact top-{args.k} search, dim {args.dim}, "
                f"{args.queries} queries", formats=formats)
    summary = [f"{r['config']}: {r['samples_per_s']:.0f} samples/s per GPU, MFU "
               + (f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a (peak unknown)")
               for r in rows]
    summary += [f"N={r['N']:,} {r['config']}: {r['x_cpu']:.1f}x FAISS CPU"
                for r in search_rows if r.get("x_cpu") and r["x_cpu"] != 1.0]
    print("\n" + "\n".join(summary))
    return save_run(args, rows + search_rows, {
        "title": text.splitlines()[0], "summary": summary, "columns": train_cols,
        "search_columns": search_cols, "formats": formats, "device": name, "peak_flops": peak,
        "cuda": torch.version.cuda, "threads_applied": threads,
        "flops": "torch.utils.flop_counter.FlopCounterMode, one forward + backward"})


if __name__ == "__main__":
    sys.exit(main())
