"""Fitting the feature teacher on a feature checkpoint's pairs (`raycmr teacher`): the
distillation teacher of ``loss.distill.feature_teacher``.

The teacher (:mod:`raycmr.models.feature_teacher`) scores a ``text_feat`` query against an
image's raw ``image_feat`` vector. Pairs come from the checkpoint's Ray Data pipeline (decoded and
embedded on actors, :func:`embed_split`); the fitting is :func:`raycmr.teacher.fit.fit_teacher`
on the driver (in-batch softmax; a small model). Image checkpoints are refused
(:data:`IMAGE_GALLERY_ERROR`): their slow model is the captioning model of
:mod:`raycmr.models.slow`. On held-out pairs it reports text->image R@1 among blocks of
``candidates`` images side by side: the dual encoder's dot product and the trained teacher.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from raycmr.config import ConfigError

IMAGE_GALLERY_ERROR = (
    "`raycmr teacher` fits the feature-shard distillation teacher only: for image galleries the "
    "slow stage is the captioning model, trained on the cluster with `raycmr train --config "
    "quickstart_slow slow.fast_checkpoint=FAST` and stored with the index by `raycmr index "
    "--checkpoint FAST --slow SLOW --out DIR`")


def collect_pairs(cfg, model, paths: list[str], *, num_actors: int, batch_size: int,
                  ) -> dict[str, Any]:
    """The teacher's training inputs for every valid pair of ``paths``: ``query`` (a dict of
    tensors), ``image`` [n, d] (what the index stores), ``group`` [n], and the dual encoder's
    retrieval vectors ``fast_img``/``fast_txt`` for the side-by-side report."""
    import torch

    from raycmr.data.schema import check_shards
    from raycmr.evaluate.embedding import embed_split

    check_shards(paths, cfg.data.kind, cfg.data.format)
    features = cfg.data.kind == "features"
    keep = ("image_feat", "text_feat") if features else ("input_ids", "attention_mask")
    emb = embed_split(paths, cfg, model.state_dict(), num_actors=num_actors,
                      batch_size=batch_size, keep=keep)
    if len(emb["group"]) < 2:
        raise ConfigError(f"the shards {paths} hold {len(emb['group'])} valid pairs; the "
                          "teacher needs at least 2")
    if features:
        query = {"text_feat": torch.from_numpy(emb["text_feat"].astype(np.float32))}
        image = emb["image_feat"]
    else:
        query = {"input_ids": torch.from_numpy(emb["input_ids"].astype(np.int64)),
                 "attention_mask": torch.from_numpy(emb["attention_mask"].astype(np.int64))}
        image = emb["img_common"]
    return {"query": query, "image": torch.from_numpy(np.ascontiguousarray(image, np.float32)),
            "group": torch.from_numpy(emb["group"].astype(np.int64)),
            "fast_img": emb["img"], "fast_txt": emb["txt"]}


def block_recall_at_1(scores_fn, groups: np.ndarray, block: int, seed: int = 0) -> float:
    """Text->image R@1 (%) with each query ranking the ``block`` images of its own block of
    pairs (pairs shuffled with ``seed``, the last partial block dropped unless it is the only
    one). A hit is the top image belonging to the query's group (captions of one image share
    it). ``scores_fn(rows)`` returns the [len(rows), len(rows)] query x image scores."""
    n = len(groups)
    order = np.random.default_rng(seed).permutation(n)
    b = min(block, n)
    hits, total = 0, 0
    for start in range(0, n - b + 1, b):
        rows = order[start:start + b]
        top = np.asarray(scores_fn(rows)).argmax(axis=1)
        hits += int((groups[rows][top] == groups[rows]).sum())
        total += b
    return 100.0 * hits / total


def auto_fast_weight(cfg, model) -> float:
    """Weight of the fast score in a residual model: the dual encoder's learned inverse
    temperature for InfoNCE checkpoints (its calibrated logits), else 10 (cosines x 10)."""
    if cfg.loss.kind == "infonce":
        return float(model.logit_scale.detach().exp())
    return 10.0


def teacher_config(cfg, pairs: dict[str, Any], *, width: int, heads: int, layers: int,
                   fast_weight: float = 0.0):
    """The :class:`FeatureTeacherConfig` that fits this checkpoint's queries and stored images."""
    from raycmr.data.text import load_tokenizer
    from raycmr.models.feature_teacher import FeatureTeacherConfig

    shape: dict[str, Any] = {"image_dim": int(pairs["image"].shape[1]), "width": width,
                             "heads": heads, "layers": layers, "fast_weight": fast_weight}
    if "text_feat" in pairs["query"]:
        return FeatureTeacherConfig(query="features",
                                    text_dim=int(pairs["query"]["text_feat"].shape[1]), **shape)
    return FeatureTeacherConfig(query="tokens",
                                vocab_size=len(load_tokenizer(cfg.data.tokenizer)),
                                max_text_len=cfg.data.max_text_len, **shape)


def train_teacher(checkpoint: str, out: str | Path, *, split: str = "train",
                  eval_split: str = "val", steps: int = 500, batch_size: int = 64,
                  lr: float = 3e-3, width: int = 64, heads: int = 4, layers: int = 1,
                  candidates: int = 100, num_actors: int = 2, seed: int = 0,
                  fast_weight: float | None = 0.0) -> dict[str, Any]:
    """Fit a feature teacher on ``split`` of ``checkpoint``'s config, save it to ``out``, and
    return the held-out report (``fast_r1``, ``teacher_r1`` in %, over blocks of
    ``candidates``). ``fast_weight`` 0 (the default) trains the teacher's own score; > 0 makes
    it residual (see ``FeatureTeacherConfig.fast_weight``; not usable as a distillation
    teacher); None picks :func:`auto_fast_weight`."""
    import torch

    from raycmr.artifacts import load_exported, save_feature_teacher
    from raycmr.index.gallery import resolve_split
    from raycmr.models.feature_teacher import FeatureTeacher, select_queries
    from raycmr.runtime import init_ray
    from raycmr.teacher.fit import fit_teacher

    model, cfg = load_exported(checkpoint)
    if cfg.data.kind != "features":
        raise ConfigError(IMAGE_GALLERY_ERROR)
    init_ray(min_cpus=num_actors + 1)
    t0 = time.perf_counter()
    train = collect_pairs(cfg, model, resolve_split(cfg, split), num_actors=num_actors,
                          batch_size=256)
    held = None
    if eval_split:
        held = collect_pairs(cfg, model, resolve_split(cfg, eval_split), num_actors=num_actors,
                             batch_size=256)
    if fast_weight is None:
        fast_weight = auto_fast_weight(cfg, model)
    torch.manual_seed(seed)
    teacher = FeatureTeacher(teacher_config(cfg, train, width=width, heads=heads,
                                            layers=layers, fast_weight=fast_weight))
    fast_vecs = None
    if fast_weight > 0:
        fast_vecs = (torch.from_numpy(train["fast_txt"]), torch.from_numpy(train["fast_img"]))
    losses = fit_teacher(teacher, train["query"], train["image"], groups=train["group"],
                         fast=fast_vecs, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    save_feature_teacher(teacher, out)
    report: dict[str, Any] = {"pairs": len(train["group"]), "steps": steps,
                              "fast_weight": fast_weight,
                              "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
                              "fit_s": time.perf_counter() - t0, "out": str(out)}
    if held is not None:
        groups = held["group"].numpy()

        def fast(rows):
            return held["fast_txt"][rows] @ held["fast_img"][rows].T

        @torch.no_grad()
        def slow(rows):
            image = held["image"][torch.from_numpy(rows)]
            scores = teacher.score_candidates(select_queries(held["query"], rows),
                                               image.unsqueeze(0).expand(len(rows), -1, -1))
            return scores.numpy() + fast_weight * fast(rows)  # the residual score

        report.update(eval_pairs=len(groups), candidates=min(candidates, len(groups)),
                      fast_r1=block_recall_at_1(fast, groups, candidates, seed),
                      teacher_r1=block_recall_at_1(slow, groups, candidates, seed))
    return report
