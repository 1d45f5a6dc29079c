"""The global contrastive loss as the workers grow: ``loss.anchors=global`` (N x N per rank)
against ``local`` (own B anchors x all N candidates, one backward collective).

Measured: ``W`` = 1, 2, 4, 8 real gloo ranks (processes) on this machine, the loss alone on
fixed unit-norm embeddings (``B`` rows per rank, dimension ``d``, fp32): each step is the packed
gather, the loss and its backward (the gather's backward included). Per rank: wall time and CPU
time of a step (medians; ``W`` processes share this machine's cores, so CPU time is the fairer
per-rank work figure) and the peak resident memory the step adds (``VmHWM`` reset through
``/proc/self/clear_refs`` before the steps; glibc's mmap threshold fixed at 64 KiB so that
freed tensors leave RSS at once).

Projected: per-rank bytes and FLOPs of the loss at ``B = 256``, ``d = 512`` for ``W = 8 ...
1,024``, from :func:`projection` (FLOPs from the similarity matrices each mode multiplies;
bytes from a fit of the measured peaks, ``a N^2 + c N`` or ``c N``), and where each mode stops
fitting an 80 GB GPU.

``--from-json``: redo the tables, projection and PNG from a saved result (no measuring).

    python benchmarks/bench_loss_scaling.py                    # W = 1 2 4 8, MH and InfoNCE
    python benchmarks/bench_loss_scaling.py --workers 1 2 --repeats 3
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

try:  # `python -m benchmarks.bench_loss_scaling` from the repo root
    from benchmarks.common import REPO_ROOT, print_table, write_result
    from benchmarks.raybench import med, spread
    from benchmarks.spawned import gloo_rank, run_spawned
except ImportError:  # `python benchmarks/bench_loss_scaling.py`
    from common import REPO_ROOT, print_table, write_result
    from raybench import med, spread
    from spawned import gloo_rank, run_spawned

from raycmr.losses.batch import global_batch
from raycmr.losses.contrastive import infonce_loss, vse_loss

NAME = "bench_loss_scaling"
GPU_BYTES = 80e9
PROJECT_WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=256, help="rows per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["vse_mh", "infonce"],
                   choices=["vse_mh", "vse_sh", "infonce"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--png", default=str(REPO_ROOT / "docs" / "loss_scaling.png"))
    p.add_argument("--out", default=NAME)
    p.add_argument("--from-json", default="", help="a saved result: tables and PNG only")
    return p.parse_args(argv)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss(kind: str, batch) -> torch.Tensor:
    if kind == "infonce":
        return infonce_loss(batch, torch.tensor(2.6593)).loss
    return vse_loss(batch, margin=0.2, hardest=kind == "vse_mh").loss


def _worker(rank: int, world: int, port: int, job: dict[str, Any], out_path: str) -> None:
    with gloo_rank(rank, world, port, job["threads"]):
        b, d = job["batch"], job["dim"]
        g = torch.Generator().manual_seed(rank)
        img, txt = (torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
                    .requires_grad_() for _ in range(2))
        groups = torch.arange(b) + rank * b

        def step() -> None:
            batch = global_batch(img, txt, groups, b, job["anchors"])
            _loss(job["kind"], batch).backward()
            img.grad = txt.grad = None

        step()  # warm-up: first-call paths, thread pools
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _rss_kb("VmRSS")
        walls, cpus = [], []
        for _ in range(job["repeats"]):
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        peak = (_rss_kb("VmHWM") - base) / 1024
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, {"wall": walls, "cpu": cpus, "peak_mb": peak})
        if rank == 0:
            Path(out_path).write_text(json.dumps(parts))


def measure(world: int, job: dict[str, Any]) -> list[dict[str, Any]]:
    return run_spawned(_worker, world, job)


def projection(kind: str, anchors: str, workers: int, b: int, d: int,
               memory: tuple[float, float]) -> dict[str, float]:
    """Per-rank FLOPs and bytes of one loss step (forward + backward) at ``b`` rows per rank.

    Scores per rank: ``S = N^2`` (global: one matmul, text->image is its transpose) or
    ``S = 2 B N`` (local: image->text and text->image, two ``B x N`` products). FLOPs: MH
    multiplies once (``2 S d``; its backward is O(N d): only the hardest negatives get a
    gradient); SH and InfoNCE also multiply in the backward (``6 S d``). Bytes:
    ``memory = (a, c)``: ``a N^2 + c N`` (global) or ``c N`` (local, where the scores and the
    gathered rows both grow as ``N`` at fixed ``B``, ``d``), from the measured peaks at the same
    ``B`` and ``d`` (:func:`fit_memory`).
    """
    n = workers * b
    scores = n * n if anchors == "global" else 2 * b * n
    flops = (2 if kind == "vse_mh" else 6) * scores * d
    a, c = memory
    return {"scores": scores, "tflop": flops / 1e12, "gb": (a * n * n + c * n) / 1e9}


#: bytes per score that MH's global mode holds at once, read from the code: the fp32 masked
#: score matrix and the bool matrix that finds each column's hardest row (4 + 1). At W <= 8
#: the backward's gathered-row buffers outweigh it, so a fit alone would miss it.
SCORE_BYTES_FLOOR = {"vse_mh": 5.0}


def fit_memory(rows: list[dict[str, Any]], kind: str, anchors: str) -> tuple[float, float]:
    """``(a, c)`` of ``a N^2 + c N`` bytes from the measured peaks (W >= 2). ``c``: least squares
    of local's peaks on ``N`` (the gathered rows, their gradient and local's ``B x N`` scores
    all grow as ``N`` at fixed ``B``, ``d``); global: ``a`` from what its peaks exceed
    ``c N`` by, at least :data:`SCORE_BYTES_FLOOR`."""
    import numpy as np

    def points(mode: str) -> tuple[Any, Any]:
        sel = [r for r in rows if r["kind"] == kind and r["anchors"] == mode and r["workers"] > 1]
        return (np.array([float(r["N"]) for r in sel]),
                np.array([r["peak_mb"] * 2**20 for r in sel]))

    n, y = points("local")
    c = float(max((n @ y) / (n @ n), 0.0)) if len(n) else 0.0
    if anchors == "local":
        return 0.0, c
    n, y = points("global")
    sq = n * n
    a = float(max(sq @ (y - c * n) / (sq @ sq), 0.0)) if len(n) else 0.0
    return max(a, SCORE_BYTES_FLOOR.get(kind, 0.0)), c


def plot(rows: list[dict[str, Any]], proj: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in sorted({r["kind"] for r in rows}):
        for anchors, style in (("global", "-o"), ("local", "--s")):
            sel = sorted((r for r in rows if r["kind"] == kind and r["anchors"] == anchors),
                         key=lambda r: r["workers"])
            w = [r["workers"] for r in sel]
            axes[0].plot(w, [r["cpu_ms"] for r in sel], style, label=f"{kind} {anchors}")
            axes[1].plot(w, [r["peak_mb"] for r in sel], style, label=f"{kind} {anchors}")
            p = sorted((r for r in proj if r["kind"] == kind and r["anchors"] == anchors),
                       key=lambda r: r["workers"])
            axes[2].plot([r["workers"] for r in p], [r["gb"] for r in p], style,
                         label=f"{kind} {anchors}")
    axes[2].axhline(GPU_BYTES / 1e9, color="k", lw=0.8)
    axes[2].text(8, GPU_BYTES / 1e9 * 1.15, "80 GB", fontsize=8)
    titles = ("measured: CPU ms per rank per step", "measured: peak MB added per rank",
              "projected: GB per rank, B=256, d=512")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers W")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # tensors above 64 KiB get their own mapping and leave RSS when freed: VmHWM tracks them
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = json.loads(Path(args.from_json).read_text())["rows"] if args.from_json else []
    for kind in [] if args.from_json else args.kinds:
        for world in args.workers:
            for anchors in ("global", "local"):
                job = {"kind": kind, "anchors": anchors, "batch": args.batch, "dim": args.dim,
                       "repeats": args.repeats, "threads": args.threads}
                ranks = measure(world, job)
                walls = [med(r["wall"]) for r in ranks]
                cpus = [med(r["cpu"]) for r in ranks]
                n = world * args.batch
                rows.append({
                    "kind": kind, "workers": world, "anchors": anchors, "batch": args.batch,
                    "dim": args.dim, "N": n,
                    "scores_per_rank": n * n if anchors == "global" or world == 1
                    else 2 * args.batch * n,
                    "wall_ms": 1e3 * max(walls), "cpu_ms": 1e3 * med(cpus),
                    "cpu_spread_ms": spread([1e3 * c for c in cpus]),
                    "peak_mb": max(r["peak_mb"] for r in ranks)})
                print(f"{kind} W={world} {anchors}: cpu {rows[-1]['cpu_ms']:.1f} ms, "
                      f"wall {rows[-1]['wall_ms']:.1f} ms, peak +{rows[-1]['peak_mb']:.1f} MB",
                      flush=True)
    proj = []
    fits = {}
    for kind in args.kinds:
        for anchors in ("global", "local"):
            fits[f"{kind}/{anchors}"] = bps = fit_memory(rows, kind, anchors)
            for w in PROJECT_WORKERS:
                proj.append({"kind": kind, "anchors": anchors, "workers": w,
                             **projection(kind, anchors, w, 256, 512, bps)})
    limits = []
    for kind in args.kinds:
        for anchors in ("global", "local"):
            bps, w = fits[f"{kind}/{anchors}"], 0
            while w < 1 << 16 and projection(kind, anchors, w + 1, 256, 512, bps)["gb"] \
                    <= GPU_BYTES / 1e9:
                w += 1
            limits.append(f"{kind} {anchors}: one rank's loss fits 80 GB up to W = {w} "
                          f"(B = 256, d = 512; fitted bytes {bps[0]:.2f} N^2 + {bps[1]:,.0f} N)"
                          + ("; beyond 65,536 workers" if w >= 1 << 16 else ""))
    crossover = []
    for kind in args.kinds:
        for world in args.workers:
            g = [r for r in rows if (r["kind"], r["workers"], r["anchors"]) ==
                 (kind, world, "global")]
            lo = [r for r in rows if (r["kind"], r["workers"], r["anchors"]) ==
                  (kind, world, "local")]
            if g and lo and world > 1:
                crossover.append(f"{kind} W={world}: local/global CPU {lo[0]['cpu_ms'] / g[0]['cpu_ms']:.2f}, "
                                 f"wall {lo[0]['wall_ms'] / g[0]['wall_ms']:.2f}")
    columns = ["kind", "workers", "anchors", "N", "scores_per_rank", "cpu_ms", "cpu_spread_ms",
               "wall_ms", "peak_mb"]
    title = (f"loss alone per rank, B={args.batch}/rank, d={args.dim}, fp32, gloo, "
             f"{args.threads} thread(s)/rank, medians of {args.repeats} steps (shared machine)")
    text = print_table(rows, columns, title=title,
                       formats={"cpu_ms": ".1f", "wall_ms": ".1f", "peak_mb": ".1f"})
    pcols = ["kind", "anchors", "workers", "scores", "tflop", "gb"]
    ptext = print_table(proj, pcols, title="projection per rank, B=256, d=512 (fp32 scores)",
                        formats={"tflop": ".3f", "gb": ".2f"})
    print("\n" + "\n".join(crossover + limits))
    plot(rows, proj, args.png)
    meta = dict(vars(args))
    meta.update({"title": text.splitlines()[0], "projection": proj, "projection_table": ptext,
                 "memory_fit_n2_n": fits, "limits": limits, "crossover": crossover})
    path = write_result(args.out, rows, meta)
    print(f"\nwrote {path} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
