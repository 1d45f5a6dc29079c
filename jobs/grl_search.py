"""The GRL modality adversary on the Wikipedia features: a `raycmr tune` search, then seeds.

    nice -n 5 python jobs/grl_search.py [--out out/grl] [--samples 10] [--epochs 12]
                                        [--seeds 5] [--concurrent 3] [--rows none grl reversal]

1. **Search** (one Ray Tune experiment, the code of ``raycmr tune``): the ablation's Wikipedia
   setup (``jobs/ablate.py``: MLP towers, the contrastive loss alone, common space, 2 DeepSpeed
   workers x 64 pairs) plus the adversary with the two-player confusion update
   (``loss.grl.update=confusion``), random search over its weight, the ceiling ``alpha`` and the
   steepness ``gamma`` of the DANN schedule ``lambda = alpha (2 / (1 + exp(-gamma p)) - 1)``, and
   the discriminator's learning rate and label smoothing; ASHA stops trials whose validation avg
   mAP lags. Chosen on validation only (:func:`choose`): among the trials that ran every epoch and
   whose discriminator ends within accuracy 0.4-0.6, the best validation avg mAP; when none does,
   the best validation avg mAP of all (and the table says the accuracy target is missed).
2. **Seeds**: rows ``none`` (no adversary), ``grl`` (the chosen setting), ``near_chance`` (when
   the chosen one is not in range: the best search trial in range, even one ASHA stopped, run to
   the end) and ``reversal`` (the old update, one reversed gradient, at the shipped defaults),
   each a grid over ``train.seed``;
   per trial the last epoch's validation avg mAP, modality gap and discriminator accuracy, and
   the last checkpoint's test avg mAP and modality gap (test read once per configuration).

Prints and writes ``<out>/table.md`` (mean ± sample std, and each row's difference from
``none`` with two standard errors), ``<out>/search.json`` and ``<out>/trials.json``. Tune
experiments live under ``<out>/tune/``; an existing one is continued, not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # jobs/ablate.py: the Wikipedia setup and the aggregation)

#: the searched keys (raycmr tune's space syntax)
SPACE = {
    "loss.grl.weight": {"loguniform": [0.3, 30.0]},
    "loss.grl.alpha": {"uniform": [0.2, 1.0]},
    "loss.grl.gamma": {"loguniform": [1.0, 30.0]},
    "loss.grl.disc_lr_scale": {"loguniform": [0.1, 3.0]},
    "loss.grl.label_smoothing": {"choice": [0.0, 0.2]},
}
GRL = {"loss.grl.enabled": True, "loss.grl.update": "confusion", "loss.grl.schedule": "dann"}
KEYS = ("val_avg_map", "val_modality_gap", "train_disc_acc", "train_adversary")
ACC_RANGE = (0.4, 0.6)


def choose(trials: list[dict[str, Any]], epochs: int) -> tuple[dict[str, Any], bool]:
    """The chosen search trial and whether its discriminator accuracy is within ``ACC_RANGE``:
    the best ``val_avg_map`` among full-length trials in range, else among all full-length ones."""
    full = [t for t in trials if t.get("epochs", 0) >= epochs and "val_avg_map" in t]
    if not full:
        raise ValueError("no search trial ran every epoch: nothing to choose from")
    ok = [t for t in full if ACC_RANGE[0] <= t.get("train_disc_acc", -1.0) <= ACC_RANGE[1]]
    best = max(ok or full, key=lambda t: t["val_avg_map"])
    return best, bool(ok)


def near_chance(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The search trial, of any length (ASHA may have stopped it), with the best last
    ``val_avg_map`` among those whose discriminator accuracy is within ``ACC_RANGE``: the
    setting to run to the end when :func:`choose` finds no full-length one in range."""
    ok = [t for t in trials
          if ACC_RANGE[0] <= t.get("train_disc_acc", -1.0) <= ACC_RANGE[1] and "val_avg_map" in t]
    return max(ok, key=lambda t: t["val_avg_map"]) if ok else None


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and two standard errors of that difference (independent samples,
    each side's sample variance / n)."""
    (ma, sa), (mb, sb) = ablate.mean_spread(a), ablate.mean_spread(b)
    return ma - mb, 2.0 * math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


def tune_experiment(name: str, overrides: dict[str, Any], out: Path, concurrent: int):
    """One Tune experiment over the Wikipedia setup (continued when it exists)."""
    from ray import tune

    from raycmr.config import load_config, with_overrides
    from raycmr.tune import runner

    path = runner.absolute(str(out / "tune" / name))
    if tune.Tuner.can_restore(path):
        return runner.resume(path)
    data = ablate.DATASETS["wikipedia"]
    cfg = with_overrides(load_config(data.config), {
        **data.overrides, "train.storage_path": str(out / "runs"),
        "tune.max_concurrent": concurrent, **overrides})
    return runner.start(cfg, path=path)


def finished(exp, epochs: int, searched: list[str]) -> list[dict[str, Any]]:
    """Last-epoch metrics (and the searched keys' values, the checkpoint) of each trial."""
    out = []
    for result in exp.results:
        if result.error is not None or not result.metrics:
            continue
        m = result.metrics
        trial = {"epochs": int(m.get("epoch", 0)), **{k: float(m[k]) for k in KEYS if k in m},
                 **{k: result.config[k] for k in searched if k in result.config}}
        # the trial's Ray Train run reports its checkpoint in the metrics (raycmr.tune.runner)
        checkpoint = m.get("checkpoint_path") or (result.checkpoint and result.checkpoint.path)
        if checkpoint and trial["epochs"] >= epochs:
            trial["checkpoint"] = str(checkpoint)
        out.append(trial)
    return out


def search(out: Path, samples: int, epochs: int, concurrent: int) -> list[dict[str, Any]]:
    exp = tune_experiment("search", {
        **GRL, "train.epochs": epochs, "tune.space": SPACE, "tune.search": "random",
        "tune.scheduler": "asha", "tune.num_samples": samples,
        "tune.grace_period": max(1, epochs // 3), "tune.reduction_factor": 2}, out, concurrent)
    return finished(exp, epochs, list(SPACE))


def seeds(out: Path, row: str, setting: dict[str, Any], n: int, epochs: int,
          concurrent: int, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``n`` seeds of one row, each with its last checkpoint's test avg mAP and gap (taken from
    ``done``, the trials of an earlier invocation by checkpoint, when it evaluated it)."""
    from raycmr.evaluate.checkpoint import evaluate_checkpoint

    exp = tune_experiment(f"seeds_{row}", {
        **setting, "train.epochs": epochs, "tune.space": {"train.seed": {"grid": list(range(n))}},
        "tune.search": "random", "tune.scheduler": "fifo", "tune.num_samples": 1}, out, concurrent)
    trials = [{"row": row, **t} for t in finished(exp, epochs, ["train.seed"])
              if t["epochs"] >= epochs]
    for t in trials:
        if "test_avg_map" in done.get(t["checkpoint"], {}):
            t.update({k: done[t["checkpoint"]][k] for k in ("test_avg_map", "test_modality_gap")})
            continue
        test = evaluate_checkpoint(t["checkpoint"], "test")
        t["test_avg_map"], t["test_modality_gap"] = test["avg_map"], test["modality_gap"]
    return trials


def search_table(found: list[dict[str, Any]]) -> str:
    """The search's trials, best last validation avg mAP first."""
    head = ("| weight | alpha | gamma | disc. lr x | label smoothing | epochs run | val avg mAP "
            "| val gap | disc. acc |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(found, key=lambda t: -t.get("val_avg_map", -1.0)):
        lines.append(
            f"| {t['loss.grl.weight']:.2f} | {t['loss.grl.alpha']:.2f} | "
            f"{t['loss.grl.gamma']:.1f} | {t['loss.grl.disc_lr_scale']:.2f} | "
            f"{t['loss.grl.label_smoothing']} | {t['epochs']} | {t.get('val_avg_map', math.nan):.3f}"
            f" | {t.get('val_modality_gap', math.nan):.3f} | "
            f"{t.get('train_disc_acc', math.nan):.3f} |")
    return "\n".join(lines) + "\n"


def table(trials: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """Mean ± std per row; then each row's difference from ``none`` ± two standard errors."""
    keys = [("val_avg_map", "val avg mAP"), ("test_avg_map", "test avg mAP"),
            ("val_modality_gap", "val modality gap"), ("test_modality_gap", "test modality gap"),
            ("train_disc_acc", "disc. acc (last epoch)"),
            ("train_adversary", "disc. cross-entropy (chance 0.693)")]
    text = ablate.markdown_table(trials, keys, labels)
    base = [t for t in trials if t["row"] == "none"]
    lines = ["", "| row | Δ val avg mAP vs none (± 2 s.e.) | Δ test avg mAP | Δ test gap |",
             "|---|---|---|---|"]
    for row in dict.fromkeys(t["row"] for t in trials):
        mine = [t for t in trials if t["row"] == row]
        if row == "none" or not base:
            continue
        cells = []
        for key in ("val_avg_map", "test_avg_map", "test_modality_gap"):
            d, e = difference([t[key] for t in mine], [t[key] for t in base])
            cells.append(f"{d:+.4f} ± {e:.4f}")
        lines.append(f"| {labels.get(row, row)} | " + " | ".join(cells) + " |")
    return text + "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/grl")
    parser.add_argument("--samples", type=int, default=10, help="search trials")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=3, help="trials at once (Tune)")
    parser.add_argument("--rows", nargs="+", default=["none", "grl", "near_chance", "reversal"],
                        choices=["none", "grl", "near_chance", "reversal"])
    parser.add_argument("--wikipedia-src", default=str(ablate.DEFAULT_WIKI))
    args = parser.parse_args(argv)

    from raycmr.runtime import init_ray
    from raycmr.tune.runner import DRIVER_CPUS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ablate.ensure_shards(["wikipedia"], Path(args.wikipedia_src))
    init_ray(min_cpus=args.concurrent * (2 + DRIVER_CPUS) + 2)
    start = time.time()
    found = search(out, args.samples, args.epochs, args.concurrent)
    chosen, in_range = choose(found, args.epochs)
    setting = {**GRL, **{k: chosen[k] for k in SPACE}}
    (out / "search.json").write_text(json.dumps(
        {"trials": found, "chosen": setting, "acc_in_range": in_range,
         "near_chance": near_chance(found)}, indent=1))
    print(f"[grl] search: {len(found)} trials in {time.time() - start:.0f} s; chosen "
          f"{setting} (val avg mAP {chosen['val_avg_map']:.4f}, disc. acc "
          f"{chosen.get('train_disc_acc', float('nan')):.3f}, "
          f"{'within' if in_range else 'NOT within'} {ACC_RANGE})", flush=True)
    near = near_chance(found)
    rows = {"none": {}, "grl": setting,
            "near_chance": {**GRL, **{k: near[k] for k in SPACE}} if near else None,
            "reversal": {"loss.grl.enabled": True, "loss.grl.update": "reversal"}}
    labels = {"none": "no adversary", "grl": "confusion update, chosen setting",
              "near_chance": "confusion update, best search trial with disc. acc in 0.4-0.6",
              "reversal": "reversed gradient (the old update), defaults"}
    if near is None or in_range:  # nothing in range, or the chosen setting already is
        rows.pop("near_chance")
    earlier = out / "trials.json"
    done = {t["checkpoint"]: t for t in json.loads(earlier.read_text())} if earlier.exists() else {}
    trials: list[dict[str, Any]] = []
    for row in [r for r in args.rows if r in rows]:
        trials += seeds(out, row, rows[row], args.seeds, args.epochs, args.concurrent, done)
        (out / "trials.json").write_text(json.dumps(trials, indent=1))
        (out / "table.md").write_text(f"Search ({len(found)} trials, ASHA):\n\n"
                                      f"{search_table(found)}\nSeeds:\n\n{table(trials, labels)}")
        print(f"[grl] {row}: done at {time.time() - start:.0f} s", flush=True)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
