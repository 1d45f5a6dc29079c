"""The ablation behind the README's claims: whole 2-worker runs through `raycmr tune` grid search.

    nice -n 10 python jobs/ablate.py [--out out/ablate] [--datasets quickstart wikipedia]
                                     [--rows mh sh ...] [--seeds 3] [--epochs-quickstart 4]
                                     [--epochs-wikipedia 12]

Each row is one Ray Tune experiment (``raycmr.tune.runner``, the code of ``raycmr tune``): a grid
over ``train.seed`` (one trial per seed, FIFO, every trial a whole distributed run of 2 DeepSpeed
workers, same per-worker batch unless the row sweeps it). Rows (MH = VSE++ max-of-hinges with
the quickstart's smoothed-max hand-over, ``loss.mh_warmup``; negatives gathered across workers):

    mh, sh, infonce          the loss: max-of-hinges vs sum-of-hinges vs InfoNCE
    soft_fixed               MH's smoothed max kept at tau 0.05 (the control: is it MH or the
                             smoothing with a margin that trains?)
    mh_local                 MH with each worker's own negatives only (loss.global_negatives=false)
    mh_grl                   MH + the GRL modality adversary, one reversed gradient
                             (loss.grl.update=reversal; the two-player update: grl_search.py)
    mh_b16, mh_b32, mh_b128  MH at 16/32/128 pairs per worker (mh itself is 64): global batch x2

Datasets: ``quickstart`` (synthetic shapes, the shipped quickstart config's towers; text->image R@1
and rsum) and ``wikipedia`` (the Wikipedia features, MLP towers, contrastive loss alone, ranked
in the common space; mAP both ways). Every number is the validation split's at the run's last
epoch (nothing is selected with it). Per row: mean and sample standard deviation over seeds,
plus the modality gap (centroid distance of image and text embeddings) and, with GRL, the
discriminator's accuracy in the last epoch. The main metric at half the epochs (from the same
runs) checks that the rows rank alike at a smaller budget.

Writes under ``--out``: ``<dataset>/tune/<row>/`` (the Tune experiments; an existing one is
continued, not rerun), ``<dataset>/trials.json`` (every finished trial), ``<dataset>/table.md``
and ``<dataset>/ablation.png``, rewritten after every row, so a cut-short run keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikipedia"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    per_worker_batch: int = 64


ROWS = [
    Row("mh", "MH (global negatives)"),
    Row("sh", "SH", {"loss.kind": "vse_sh"}),
    Row("infonce", "InfoNCE", {"loss.kind": "infonce"}),
    Row("soft_fixed", "smoothed MH, never annealed to MH (tau 0.05 throughout)",
        {"loss.mh_warmup.start": 1.0, "loss.mh_warmup.end": 1.0}),
    Row("mh_local", "MH, local negatives only", {"loss.global_negatives": False}),
    # the update these figures were measured with; the confusion update: jobs/grl_search.py
    Row("mh_grl", "MH + GRL adversary (reversed gradient)",
        {"loss.grl.enabled": True, "loss.grl.update": "reversal"}),
    Row("mh_b16", "MH, batch 16/worker", {"train.batch_size": 16}, 16),
    Row("mh_b32", "MH, batch 32/worker", {"train.batch_size": 32}, 32),
    Row("mh_b128", "MH, batch 128/worker", {"train.batch_size": 128}, 128),
]
BATCH_ROWS = ("mh_b16", "mh_b32", "mh", "mh_b128")


@dataclass(frozen=True)
class Dataset:
    config: str
    overrides: dict[str, Any]
    metrics: tuple[tuple[str, str], ...]  # (reported key, column title); the first is the main one


DATASETS = {
    "quickstart": Dataset("quickstart", {
        "loss.kind": "vse_mh", "data.train": ["out/quickstart/shards/train"],
        "data.val": ["out/quickstart/shards/val"],
    }, (("val_t2i_r1", "t2i R@1"), ("val_rsum", "rsum"))),
    "wikipedia": Dataset("wikipedia", {
        # the contrastive loss alone, ranked in the common space
        "loss.kind": "vse_mh", "loss.weight": 1.0, "loss.dscmr.enabled": False,
        "loss.mh_warmup.loss": "soft", "loss.mh_warmup.end": 1.0,  # as the quickstart's
        "model.num_classes": 0, "model.retrieval_space": "common", "train.lr": 0.001,
        "train.checkpoint_every_epochs": 1000, "train.log_every": 1000,
        "data.train": ["out/wikipedia/shards/train"], "data.val": ["out/wikipedia/shards/val"],
    }, (("val_avg_map", "avg mAP"), ("val_i2t_map", "i2t mAP"), ("val_t2i_map", "t2i mAP"))),
}
EXTRA = (("val_modality_gap", "modality gap"), ("train_disc_acc", "disc. acc"))


# ------------------------------------------------------------------------------ aggregation


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value); NaN when empty."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(trials: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Any]]:
    """``{row: {key: (mean, std), "n": seeds}}`` over the trials of each row (keys a trial lacks
    are skipped for it)."""
    out: dict[str, dict[str, Any]] = {}
    for row in dict.fromkeys(t["row"] for t in trials):
        mine = [t for t in trials if t["row"] == row]
        out[row] = {"n": len(mine)}
        for key in keys:
            out[row][key] = mean_spread([float(t[key]) for t in mine if key in t])
    return out


def _cell(stat: tuple[float, float], scale: float) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "-"
    digits = 1 if scale >= 10 else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(trials: list[dict[str, Any]], columns: list[tuple[str, str]],
                   labels: dict[str, str]) -> str:
    """One line per row (in order of first appearance): mean ± std over its seeds."""
    stats = aggregate(trials, [k for k, _ in columns])
    head = "| row | seeds | " + " | ".join(title for _, title in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for row, s in stats.items():
        cells = [_cell(s[k], 100.0 if "r1" in k or "rsum" in k else 1.0) for k, _ in columns]
        lines.append(f"| {labels.get(row, row)} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rank_order(trials: list[dict[str, Any]], key: str) -> list[str]:
    """Rows from best to worst by the mean of ``key``."""
    stats = aggregate(trials, [key])
    return sorted((r for r in stats if not math.isnan(stats[r][key][0])),
                  key=lambda r: -stats[r][key][0])


# ------------------------------------------------------------------------------ outputs


def write_outputs(folder: Path, name: str, data: Dataset, trials: list[dict[str, Any]]) -> None:
    labels = {r.key: r.label for r in ROWS}
    main = data.metrics[0][0]
    half = f"{main}@half"
    columns = [*data.metrics, *EXTRA, (half, f"{data.metrics[0][1]} at half the epochs")]
    table = markdown_table(trials, list(columns), labels)
    full_rank, half_rank = rank_order(trials, main), rank_order(trials, half)
    text = (f"## {name}\n\nValidation split, last epoch; mean ± sample std over seeds.\n\n{table}"
            f"\nRanking by {main}: {' > '.join(full_rank)}\n"
            f"Ranking at half the epochs: {' > '.join(half_rank)}\n")
    (folder / "table.md").write_text(text)
    (folder / "trials.json").write_text(json.dumps(trials, indent=1))
    plot(folder / "ablation.png", name, data, trials, labels)


def plot(path: Path, name: str, data: Dataset, trials: list[dict[str, Any]],
         labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main, title = data.metrics[0]
    stats = aggregate(trials, [main])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = list(stats)
    ax1.barh([labels.get(r, r) for r in rows], [stats[r][main][0] for r in rows],
             xerr=[stats[r][main][1] for r in rows], capsize=3, color="tab:blue")
    ax1.invert_yaxis()
    ax1.set_xlabel(f"{title} (validation, mean ± std over seeds)")
    ax1.set_title(f"{name}: rows")
    sweep = [r for r in BATCH_ROWS if r in stats]
    batch = {r.key: r.per_worker_batch * 2 for r in ROWS}
    if sweep:
        ax2.errorbar([batch[r] for r in sweep], [stats[r][main][0] for r in sweep],
                     yerr=[stats[r][main][1] for r in sweep], marker="o", capsize=3)
        ax2.set_xscale("log", base=2)
    ax2.set_xlabel("global batch (2 workers)")
    ax2.set_ylabel(title)
    ax2.set_title(f"{name}: MH, global negatives, batch sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ running


def trial_rows(exp, row: str, keys: list[str], epochs: int) -> list[dict[str, Any]]:
    """The finished trials of one row's experiment: last-epoch metrics + the main metric at
    half the epochs."""
    out = []
    main = keys[0]
    for result in exp.results:
        if result.error is not None or not result.metrics:
            continue
        metrics = result.metrics
        if int(metrics.get("epoch", 0)) < epochs:
            continue
        trial = {"row": row, "seed": int(result.config.get("train.seed", -1)),
                 "epochs": int(metrics["epoch"])}
        trial.update({k: float(metrics[k]) for k in keys if k in metrics})
        history = result.metrics_dataframe
        at_half = history[history["epoch"] == max(1, epochs // 2)]
        if len(at_half) and main in at_half:
            trial[f"{main}@half"] = float(at_half[main].iloc[-1])
        out.append(trial)
    return out


def run_row(name: str, data: Dataset, row: Row, out: Path, seeds: int, epochs: int,
            concurrent: int):
    from raycmr.config import load_config, with_overrides
    from raycmr.tune import runner

    path = runner.absolute(str(out / name / "tune" / row.key))
    cfg = load_config(data.config)
    cfg = with_overrides(cfg, {
        **data.overrides, **row.overrides, "train.epochs": epochs,
        "train.storage_path": str(out / name / "runs"),
        "tune.space": {"train.seed": {"grid": list(range(seeds))}},
        "tune.search": "random", "tune.scheduler": "fifo", "tune.num_samples": 1,
        "tune.max_concurrent": concurrent,
    })
    from ray import tune

    if tune.Tuner.can_restore(path):
        return runner.resume(path)
    return runner.start(cfg, path=path)


def ensure_shards(names: list[str], wiki: Path) -> None:
    from raycmr.data.synthetic import write_synthetic_splits
    from raycmr.data.writers import write_wikipedia_shards

    if "quickstart" in names and not Path("out/quickstart/shards/test").exists():
        write_synthetic_splits(Path("out/quickstart/shards"), n_train=4000, n_val=500, n_test=500,
                               seed=0)
    if "wikipedia" in names and not Path("out/wikipedia/shards/test").exists():
        write_wikipedia_shards(wiki, "out/wikipedia/shards", overwrite=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/ablate")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rows", nargs="+", default=[r.key for r in ROWS],
                        choices=[r.key for r in ROWS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs-quickstart", type=int, default=4)
    parser.add_argument("--epochs-wikipedia", type=int, default=12)
    parser.add_argument("--concurrent", type=int, default=3, help="trials at once (Tune)")
    parser.add_argument("--wikipedia-src", default=str(DEFAULT_WIKI))
    args = parser.parse_args(argv)

    from raycmr.runtime import init_ray
    from raycmr.tune.runner import DRIVER_CPUS

    out = Path(args.out)
    ensure_shards(args.datasets, Path(args.wikipedia_src))
    init_ray(min_cpus=args.concurrent * (2 + DRIVER_CPUS) + 2)
    start = time.time()
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name in args.datasets}
    # row by row, each on every dataset: a run cut short still has the first rows of both
    for row in [r for r in ROWS if r.key in args.rows]:
        for name in args.datasets:
            data = DATASETS[name]
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            epochs = args.epochs_quickstart if name == "quickstart" else args.epochs_wikipedia
            keys = [k for k, _ in data.metrics] + [k for k, _ in EXTRA]
            began = time.time()
            exp = run_row(name, data, row, out, args.seeds, epochs, args.concurrent)
            got = trial_rows(exp, row.key, keys, epochs)
            trials[name].extend(got)
            write_outputs(folder, name, data, trials[name])
            print(f"[ablate] {name} {row.key}: {len(got)}/{args.seeds} seeds finished in "
                  f"{time.time() - began:.0f} s (total {time.time() - start:.0f} s)", flush=True)
    for name in args.datasets:
        print((out / name / "table.md").read_text(), flush=True)
    print(f"[ablate] done in {time.time() - start:.0f} s; tables and plots under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
