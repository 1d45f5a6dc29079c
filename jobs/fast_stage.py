"""The fast stage over seeds: `jobs/quickstart.py --minimal-pairs` once per seed (2 DeepSpeed
workers each), then a table of test text->image R@1 (mean, std, 2 standard errors), minimal-pair
group accuracy and wall time per run.

    python jobs/fast_stage.py [--seeds 0 1 2] [--out out/fast_stage] [--retries 2]
        [--config quickstart] [dotted overrides...]

Runs go one after another. Writes OUT/runs.json after every run and OUT/table.md at the end
(docs/fast_stage.md quotes it). Reads the test split once per run: choose settings on
validation first (jobs/loss_probe.py, `raycmr tune`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def summary(values: list[float]) -> str:
    """``mean ± std (± 2 SE)`` over runs (std and SE need two runs)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    std = statistics.stdev(values)
    return f"{mean:.1f} ± {std:.1f} (± {2 * std / len(values) ** 0.5:.1f})"


def table(rows: list[dict]) -> str:
    keys = [("t2i_r1", "test text->image R@1"), ("i2t_r1", "test image->text R@1"),
            ("group_acc", "minimal-pair group accuracy"), ("group_chance", "its chance level"),
            ("quickstart_time_s", "quickstart wall time (s)")]
    lines = ["| measure | " + " | ".join(f"seed {r['seed']}" for r in rows) +
             " | mean ± std (± 2 SE) |", "|---" * (len(rows) + 2) + "|"]
    for key, label in keys:
        if all(key in r for r in rows):
            lines.append(f"| {label} | " + " | ".join(f"{r[key]:.1f}" for r in rows) +
                         f" | {summary([r[key] for r in rows])} |")
    kinds = sorted(k[len("group_acc_"):] for k in rows[0] if k.startswith("group_acc_"))
    for kind in kinds:
        key = f"group_acc_{kind}"
        if all(key in r for r in rows):
            lines.append(f"| group accuracy, {kind} swaps (chance "
                         f"{rows[0][f'group_chance_{kind}']:.1f}) | " +
                         " | ".join(f"{r[key]:.1f}" for r in rows) +
                         f" | {summary([r[key] for r in rows])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/fast_stage")
    p.add_argument("--retries", type=int, default=2, help="reruns of a seed whose run failed")
    p.add_argument("--config", default="quickstart", help="jobs/quickstart.py's --config")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        metrics = out / f"seed{seed}.json"
        cmd = [sys.executable, "jobs/quickstart.py", "--config", args.config, "--minimal-pairs",
               "--json", str(metrics),
               f"train.seed={seed}", f"train.name=fast-seed{seed}", *args.overrides]
        for _ in range(1 + args.retries):  # a local Ray cluster can time out on a busy machine
            with open(out / f"seed{seed}.log", "w") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if not code:
                break
        if code:
            raise SystemExit(f"seed {seed} failed ({code}): see {out / f'seed{seed}.log'}")
        rows.append({"seed": seed, **json.loads(metrics.read_text())})
        (out / "runs.json").write_text(json.dumps(rows, indent=2))
        print(f"seed {seed}: test t2i R@1 {rows[-1]['t2i_r1']:.1f}, group accuracy "
              f"{rows[-1].get('group_acc', float('nan')):.1f}, "
              f"{rows[-1]['quickstart_time_s']:.0f} s", flush=True)
    (out / "table.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
