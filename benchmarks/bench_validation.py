"""Validation at 2 workers side by side: every rank embeds the whole set vs each its share.

Before: every rank embedded the whole validation set and computed the metrics (so that ZeRO-3
saw the same forwards everywhere). After (``raycmr.train.loop.validate``): batch ``b`` is
embedded on rank ``b mod 2`` (:func:`raycmr.distributed.sharded_map`, one extra forward on a
rank that is a batch short under ZeRO-3), the results are gathered once and rank 0 computes
the metrics. A 2-process gloo harness around the quickstart model's encoder (tiny ViT + tiny
BERT) on in-memory batches of the quickstart validation size; both arms run in the same
processes, alternated A-B, B-A by round; each time ends when both ranks are done (a barrier).
What it leaves out: the read of the validation stream from Ray Data, the same in both arms.

    python benchmarks/bench_validation.py            # 500 rows, 6 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

try:  # `python -m benchmarks.bench_validation` from the repo root
    from benchmarks.common import print_table, write_result
    from benchmarks.raybench import med, spread
    from benchmarks.spawned import gloo_rank, run_spawned
except ImportError:  # `python benchmarks/bench_validation.py`
    from common import print_table, write_result
    from raybench import med, spread
    from spawned import gloo_rank, run_spawned

from raycmr import distributed
from raycmr.config import load_config
from raycmr.evaluate.embedding import embed_batches
from raycmr.evaluate.summary import evaluate_embeddings
from raycmr.models.dual_encoder import DualEncoder
from raycmr.train.task import validate_retrieval

NAME = "bench_validation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500, help="validation rows (quickstart: 500)")
    p.add_argument("--batch", type=int, default=0, help="eval batch (0: eval.batch_size)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--small", action="store_true",
                   help="4 rounds (run_all.py --small, `make bench`)")
    p.add_argument("--out", default=NAME, help="result name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.small:
        args.rounds = 4
    return args


def _batches(cfg, rows: int, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    size, length = cfg.data.image_size, cfg.data.max_text_len
    out = []
    for start in range(0, rows, batch):
        n = min(batch, rows - start)
        out.append({"pixel_values": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
                    "input_ids": torch.randint(1000, 30000, (n, length), generator=g),
                    "attention_mask": torch.ones(n, length, dtype=torch.long),
                    "group": torch.arange(start, start + n),
                    "label": torch.full((n,), -1, dtype=torch.long)})
    return out


def _worker(rank: int, world: int, port: int, job: dict[str, Any], out_path: str) -> None:
    with gloo_rank(rank, world, port, job["threads"]):
        cfg = load_config("quickstart", [])
        torch.manual_seed(0)
        encoder = DualEncoder(cfg.model, temperature=cfg.loss.temperature).eval()
        batches = _batches(cfg, job["rows"], job["batch"] or cfg.eval.batch_size)

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder = encoder

        module = Module()

        def whole() -> dict[str, float]:  # before: every rank embeds everything
            return evaluate_embeddings(embed_batches(encoder, batches))

        def sharded() -> dict[str, float]:  # after: raycmr.train.loop.validate's path
            return validate_retrieval(module.encoder, lambda fn: distributed.sharded_map(
                batches, fn, equal_calls=True))

        arms = {"whole": whole, "sharded": sharded}
        records: list[dict[str, Any]] = []
        with torch.no_grad():
            results = {name: fn() for name, fn in arms.items()}  # warm-up, and the check
            for r in range(job["rounds"]):
                for name in (("whole", "sharded") if r % 2 == 0 else ("sharded", "whole")):
                    dist.barrier()
                    start = time.perf_counter()
                    arms[name]()
                    dist.barrier()
                    records.append({"round": r, "arm": name, "s": time.perf_counter() - start})
        if rank == 0:
            same = results["sharded"] == {f"val_{k}": v for k, v in results["whole"].items()}
            Path(out_path).write_text(json.dumps({"records": records, "same_metrics": same}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = vars(args)
    load_start = os.getloadavg()[0]
    result = run_spawned(_worker, 2, job)
    records = result["records"]
    by_round = {}
    for rec in records:
        by_round.setdefault(rec["round"], {})[rec["arm"]] = rec["s"]
    ratios = [r["sharded"] / r["whole"] for r in by_round.values()]
    rows = []
    for arm in ("whole", "sharded"):
        times = [rec["s"] for rec in records if rec["arm"] == arm]
        rows.append({"arm": arm, "rounds": len(times), "median_s": med(times),
                     "spread_s": spread(times)})
    load = os.getloadavg()
    summary = [(f"validation of {args.rows} rows at 2 workers, sharded / whole = "
                f"{med(ratios):.3f} (per-round ratios {spread(ratios)}); identical metrics: "
                f"{result['same_metrics']}; load average at start {load_start:.1f}, at end "
                f"{load[0]:.1f}")]
    columns = ["arm", "rounds", "median_s", "spread_s"]
    title = (f"validation at 2 workers (gloo), quickstart encoder, {args.rows} rows, "
             f"{args.threads} thread(s)/process: every rank the whole set vs a share each")
    print()
    text = print_table(rows, columns, title=title, formats={"median_s": ".3f"})
    print("\n" + "\n".join(summary))
    meta = dict(job)
    meta.update({"title": text.splitlines()[0], "summary": summary, "columns": columns,
                 "ratios": ratios, "same_metrics": result["same_metrics"]})
    print(f"\nwrote {write_result(args.out, rows, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
