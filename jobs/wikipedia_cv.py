"""Model selection for the `wikipedia` config by k-fold cross-validation on the training split.

The published protocol fixes the configuration without the test split. One 327-pair validation
split is noisy (+/- 0.01 avg mAP between seeds), so this script scores a configuration by the
mean over k stratified folds of the 2,173 training pairs (test pairs are never read). Each fold
trains the same objective as `raycmr train` (``CrossModalObjective``: towers, VSE++, DSCMR, GRL
as configured; AdamW with warmup + cosine, clipping) in this one process, on the global batch
``train.batch_size * train.num_workers``, and reports avg mAP@all (image->text, text->image) of
the held-out fold every ``--every`` epochs, in the retrieval space the config names.

    python jobs/wikipedia_cv.py                                       # the shipped config
    python jobs/wikipedia_cv.py --set model.retrieval_space=common    # one change, same folds

It is a fast single-process stand-in for choosing settings (about 100 s per configuration on
one core); the distributed run (`raycmr train --config wikipedia`) then trains the chosen one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raycmr.config import load_config
from raycmr.evaluate.metrics import map_both_ways
from raycmr.train.dual_encoder.objective import CrossModalObjective


def default_wikipedia_dir() -> Path:
    env = os.environ.get("RAYCMR_WIKIPEDIA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/wikipedia"


def load_training_pairs(src: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image features, text features and class ids 0..9 of the 2,173 training pairs only."""
    from scipy.io import loadmat

    mat = loadmat(str(src / "raw_features.mat"), variable_names=["I_tr", "T_tr"])
    lines = (src / "trainset_txt_img_cat.list").read_text().split("\n")
    labels = np.array([int(line.split("\t")[2]) - 1 for line in lines if line.strip()])
    return mat["I_tr"].astype(np.float32), mat["T_tr"].astype(np.float32), labels


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id of every row: each class's rows, shuffled, dealt round-robin into k folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        fold[rows] = np.arange(len(rows)) % k
    return fold


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup then cosine to 1% (DeepSpeed's WarmupCosineLR as configured by raycmr)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_and_score(cfg, data, train_rows, val_rows, seed: int, every: int) -> list[float]:
    """avg mAP of the held-out rows after every ``every`` epochs of training on ``train_rows``."""
    img, txt, labels = data
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    objective = CrossModalObjective(cfg)
    t = cfg.train
    batch = t.batch_size * t.num_workers
    steps_per_epoch = len(train_rows) // batch
    total = steps_per_epoch * t.epochs
    warmup = max(1, min(t.warmup_steps, total - 1))
    opt = torch.optim.AdamW(objective.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    img_t, txt_t, lab_t = torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(labels)
    scores, step = [], 0
    for epoch in range(1, t.epochs + 1):
        objective.train()
        order = rng.permutation(train_rows)
        for b in range(steps_per_epoch):
            rows = torch.from_numpy(order[b * batch:(b + 1) * batch])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t.lr, warmup, total)
            out = objective({"image_feat": img_t[rows], "text_feat": txt_t[rows],
                             "label": lab_t[rows], "group": rows})
            opt.zero_grad()
            out["loss"].backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), t.grad_clip)
            opt.step()
            step += 1
        if epoch % every == 0:
            objective.eval()
            with torch.no_grad():
                rows = torch.from_numpy(val_rows)
                u, v = objective.encoder.retrieval_embed({"image_feat": img_t[rows],
                                                          "text_feat": txt_t[rows]})
            scores.append(map_both_ways(u.numpy(), v.numpy(), labels[val_rows])["avg_map"])
    return scores


def cross_validate(cfg, data, k: int, seeds: list[int], every: int, fold_seed: int):
    """[runs, evals] held-out avg mAP, one run per (fold, seed)."""
    fold = stratified_folds(data[2], k, fold_seed)
    runs = []
    for f in range(k):
        train_rows, val_rows = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        for seed in seeds:
            runs.append(train_and_score(cfg, data, train_rows, val_rows, seed, every))
    return np.array(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="wikipedia")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, as for `raycmr train`")
    ap.add_argument("--src", type=Path, default=default_wikipedia_dir())
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per fold")
    ap.add_argument("--every", type=int, default=5, help="score the held-out fold every N epochs")
    ap.add_argument("--fold-seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not (args.src / "raw_features.mat").is_file():
        print(f"error: no raw_features.mat under '{args.src}'; pass --src or set "
              "RAYCMR_WIKIPEDIA_DIR to the wikipedia folder", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    t0 = time.perf_counter()
    runs = cross_validate(cfg, load_training_pairs(args.src), args.folds,
                          list(range(args.seeds)), args.every, args.fold_seed)
    mean = runs.mean(axis=0)
    sem = runs.std(axis=0) / math.sqrt(len(runs))
    epochs = [args.every * (i + 1) for i in range(len(mean))]
    best = int(np.argmax(mean))
    print(f"config {args.config} {' '.join(args.set)}".rstrip())
    print(f"{args.folds}-fold CV on the training split, {args.seeds} seed(s) per fold, "
          f"retrieval space {cfg.model.retrieval_space}: held-out avg mAP by epoch")
    print("  " + "  ".join(f"{e}:{m:.4f}" for e, m in zip(epochs, mean)))
    print(f"best epoch {epochs[best]}: {mean[best]:.4f} +/- {sem[best]:.4f} (s.e. over "
          f"{len(runs)} runs); last epoch {mean[-1]:.4f}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
