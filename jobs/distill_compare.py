"""Slow -> fast distillation against no distillation at the same number of steps: the quickstart
dual encoder trained by `raycmr train` (2 DeepSpeed workers) with and without the captioning
slow model as teacher (`loss.distill.slow`), over several seeds; text->image R@1 of the last
checkpoint on the validation split (and with `--test`, once, on the test split).

    python jobs/distill_compare.py --slow SLOW_CKPT [--seeds 0 1 2] [--epochs 3]
        [--weight 1.0] [--hard-negatives 7] [--temperature 1.0] [--test]
        [--out out/distill_compare] [--set KEY=VALUE ...]

Runs go one after another, seed by seed (undistilled, then distilled), so that a cut-short
comparison still holds pairs. Writes OUT/table.md and OUT/runs.json after every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("undistilled", "distilled")


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of the run's last epoch (largest ``epoch`` in its state.json)."""
    found = [(json.loads((c / "state.json").read_text())["epoch"], c)
             for c in run_dir.glob("checkpoint_*") if (c / "state.json").exists()]
    if not found:
        raise SystemExit(f"no checkpoint in {run_dir}: see {run_dir / 'raycmr.log'}")
    return max(found)[1]


def run_one(arm: str, seed: int, args, out: Path) -> dict:
    name = f"{arm}-s{seed}"
    run_dir = out / "runs" / name
    over = [f"train.seed={seed}", f"train.epochs={args.epochs}", "train.num_workers=2",
            f"train.storage_path={out / 'runs'}", f"train.name={name}",
            f"train.checkpoint_every_epochs={args.epochs}", "train.num_to_keep=1",
            "train.torch_threads=1", *args.set]
    if arm == "distilled":
        over += ["loss.distill.enabled=true", f"loss.distill.slow={args.slow}",
                 f"loss.distill.weight={args.weight}",
                 f"loss.distill.hard_negatives={args.hard_negatives}",
                 f"loss.distill.temperature={args.temperature}"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun must not resume an earlier run
    cmd = [str(Path(sys.executable).with_name("raycmr")), "train", "--config", "quickstart", *over]
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{name} failed ({code}): see {out / f'{name}.log'}")
    ckpt = last_checkpoint(run_dir)
    last = json.loads((ckpt / "state.json").read_text())["history"][-1]
    row = {"arm": arm, "seed": seed, "checkpoint": str(ckpt), "epochs": last["epoch"],
           "steps": last["step"], "val_t2i_r1": last["val_t2i_r1"],
           "val_t2i_r5": last["val_t2i_r5"], "val_i2t_r1": last["val_i2t_r1"],
           "train_s": round(time.time() - start, 1)}
    print(json.dumps(row), flush=True)
    return row


def add_test(row: dict, out: Path) -> None:
    """Test text->image R@1/R@5 of the row's checkpoint (`raycmr eval`, its own process)."""
    path = out / f"{row['arm']}-s{row['seed']}.test.json"
    cmd = [str(Path(sys.executable).with_name("raycmr")), "eval", "--checkpoint",
           row["checkpoint"], "--split", "test", "--json", str(path)]
    with open(out / f"{row['arm']}-s{row['seed']}.test.log", "w") as log:
        if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT):
            raise SystemExit(f"test evaluation of {row['checkpoint']} failed: see {log.name}")
    test = json.loads(path.read_text())
    row.update(test_t2i_r1=test["t2i_r1"], test_t2i_r5=test["t2i_r5"])


def mean_spread(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(rows: list[dict], args) -> str:
    keys = ["val_t2i_r1", "val_t2i_r5", "val_i2t_r1"] + (["test_t2i_r1"] if args.test else [])
    head = "| arm | seeds | steps | " + " | ".join(keys) + " | train s / run |"
    lines = [head, "|" + " --- |" * (len(keys) + 4)]
    base = [r["val_t2i_r1"] for r in rows if r["arm"] == "undistilled"]
    for arm in ARMS:
        got = [r for r in rows if r["arm"] == arm]
        if not got:
            continue
        cells = [mean_spread([r[k] for r in got if k in r]) for k in keys]
        lines.append(f"| {arm} | {' '.join(str(r['seed']) for r in got)} | "
                     f"{got[0]['steps']} | " + " | ".join(cells) +
                     f" | {statistics.mean(r['train_s'] for r in got):.0f} |")
    dist = [r["val_t2i_r1"] for r in rows if r["arm"] == "distilled"]
    if base and dist and statistics.mean(base) > 0:
        ratio = statistics.mean(dist) / statistics.mean(base)
        lines.append(f"\nmean val t2i R@1, distilled / undistilled: {ratio:.2f}x "
                     "(mean ± sample std over seeds)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", required=True, help="slow model checkpoint (the teacher)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--weight", type=float, default=1.0, help="loss.distill.weight")
    parser.add_argument("--hard-negatives", type=int, default=7)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--test", action="store_true",
                        help="also evaluate every last checkpoint on the test split (once)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the rows of OUT/runs.json and only run what is missing")
    parser.add_argument("--out", default="out/distill_compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for both arms (repeatable)")
    args = parser.parse_args(argv)
    args.slow = str(Path(args.slow).absolute())
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.reuse and (out / "runs.json").exists():
        rows = json.loads((out / "runs.json").read_text())

    def save() -> None:
        (out / "runs.json").write_text(json.dumps(rows, indent=1))
        (out / "table.md").write_text(
            f"quickstart data, {args.epochs} epochs, 2 workers x 64 pairs; teacher "
            f"{args.slow}; weight {args.weight}, m = {args.hard_negatives}, "
            f"T = {args.temperature}; overrides {' '.join(args.set) or 'none'}\n\n"
            f"{table(rows, args)}\n")

    for seed in args.seeds:
        for arm in args.arms:
            if not any(r["arm"] == arm and r["seed"] == seed for r in rows):
                rows.append(run_one(arm, seed, args, out))
                save()
    if args.test:  # once, after every run was chosen on validation
        for row in rows:
            if "test_t2i_r1" not in row:
                add_test(row, out)
                save()
    print(table(rows, args))
    print(f"wrote {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
