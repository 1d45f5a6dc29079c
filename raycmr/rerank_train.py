"""`raycmr reranker`: train the slow cross-attention reranker on a split's pairs.

The reranker (:mod:`raycmr.models.reranker`) scores a query against what ``raycmr index`` stores
for each gallery image: the raw ``image_feat`` vector for feature shards, the dual encoder's
common-space image embedding for image shards. Its queries are ``text_feat`` vectors or the
tokenized captions, whichever the checkpoint's text tower reads. Pairs come from the
checkpoint's Ray Data pipeline (decoded and embedded on actors, :func:`embed_split`); the fitting
is :func:`fit_reranker` on the driver (in-batch softmax; a small model).

Written where the Serve app looks by default (``INDEX/reranker``), or anywhere for
``loss.distill.reranker``. On held-out pairs it reports text->image R@1 among blocks of
``candidates`` images side by side: the dual encoder's dot product and the trained reranker.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from raycmr.config import ConfigError


def collect_pairs(cfg, model, paths: list[str], *, num_actors: int, batch_size: int,
                  ) -> dict[str, Any]:
    """The reranker's training inputs for every valid pair of ``paths``: ``query`` (a dict of
    tensors), ``image`` [n, d] (what the index stores), ``group`` [n], and the dual encoder's
    retrieval vectors ``fast_img``/``fast_txt`` for the side-by-side report."""
    import torch

    from raycmr.data.embed import embed_split
    from raycmr.data.schema import check_shards

    check_shards(paths, cfg.data.kind, cfg.data.format)
    features = cfg.data.kind == "features"
    keep = ("image_feat", "text_feat") if features else ("input_ids", "attention_mask")
    emb = embed_split(paths, cfg, model.state_dict(), num_actors=num_actors,
                      batch_size=batch_size, keep=keep)
    if len(emb["group"]) < 2:
        raise ConfigError(f"the shards {paths} hold {len(emb['group'])} valid pairs; the "
                          "reranker needs at least 2")
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
    """Weight of the fast score in a residual reranker: the dual encoder's learned inverse
    temperature for InfoNCE checkpoints (its calibrated logits), else 10 (cosines x 10)."""
    if cfg.loss.kind == "infonce":
        return float(model.logit_scale.detach().exp())
    return 10.0


def reranker_config(cfg, pairs: dict[str, Any], *, width: int, heads: int, layers: int,
                    fast_weight: float = 0.0):
    """The :class:`RerankerConfig` that fits this checkpoint's queries and stored images."""
    from raycmr.data.text import load_tokenizer
    from raycmr.models.reranker import RerankerConfig

    shape: dict[str, Any] = {"image_dim": int(pairs["image"].shape[1]), "width": width,
                             "heads": heads, "layers": layers, "fast_weight": fast_weight}
    if "text_feat" in pairs["query"]:
        return RerankerConfig(query="features", text_dim=int(pairs["query"]["text_feat"].shape[1]),
                              **shape)
    return RerankerConfig(query="tokens", vocab_size=len(load_tokenizer(cfg.data.tokenizer)),
                          max_text_len=cfg.data.max_text_len, **shape)


def train_reranker(checkpoint: str, out: str | Path, *, split: str = "train",
                   eval_split: str = "val", steps: int = 500, batch_size: int = 64,
                   lr: float = 3e-3, width: int = 64, heads: int = 4, layers: int = 1,
                   candidates: int = 100, num_actors: int = 2, seed: int = 0,
                   fast_weight: float | None = None) -> dict[str, Any]:
    """Fit a reranker on ``split`` of ``checkpoint``'s config, save it to ``out``, and return
    the held-out report (``fast_r1``, ``reranker_r1`` in %, over blocks of ``candidates``).
    ``fast_weight`` > 0 makes it residual (see ``RerankerConfig.fast_weight``); None picks
    :func:`auto_fast_weight`, 0 trains the slow score alone."""
    import torch

    from raycmr.index_build import resolve_split
    from raycmr.models.reranker import (
        CrossAttentionReranker,
        fit_reranker,
        save_reranker,
        select_queries,
    )
    from raycmr.runtime import init_ray
    from raycmr.train.checkpoint import find_checkpoint_dir, load_exported

    model, cfg = load_exported(find_checkpoint_dir(checkpoint))
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
    reranker = CrossAttentionReranker(reranker_config(cfg, train, width=width, heads=heads,
                                                      layers=layers, fast_weight=fast_weight))
    fast_vecs = None
    if fast_weight > 0:
        fast_vecs = (torch.from_numpy(train["fast_txt"]), torch.from_numpy(train["fast_img"]))
    losses = fit_reranker(reranker, train["query"], train["image"], groups=train["group"],
                          fast=fast_vecs, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    save_reranker(reranker, out)
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
            scores = reranker.score_candidates(select_queries(held["query"], rows),
                                               image.unsqueeze(0).expand(len(rows), -1, -1))
            return scores.numpy() + fast_weight * fast(rows)  # as the Serve app combines them

        report.update(eval_pairs=len(groups), candidates=min(candidates, len(groups)),
                      fast_r1=block_recall_at_1(fast, groups, candidates, seed),
                      reranker_r1=block_recall_at_1(slow, groups, candidates, seed))
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr reranker``."""
    p.add_argument("--checkpoint", required=True, help="dual encoder checkpoint (or run dir)")
    p.add_argument("--out", required=True,
                   help="directory to write (INDEX/reranker is where `raycmr serve` looks)")
    p.add_argument("--split", default="train", help="train, val, test or shard paths")
    p.add_argument("--eval-split", default="val",
                   help="held-out pairs for the R@1 report ('' to skip)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--candidates", type=int, default=100,
                   help="images each held-out query ranks in the R@1 report")
    p.add_argument("--fast-weight", type=float, default=None,
                   help="residual reranking: + this x the dual encoder's score (default: its "
                        "InfoNCE inverse temperature, else 10; 0 = the slow score alone)")
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data embedding actors")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr reranker``."""
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError

    try:
        report = train_reranker(
            args.checkpoint, args.out, split=args.split, eval_split=args.eval_split,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
            heads=args.heads, layers=args.layers, candidates=args.candidates,
            num_actors=args.num_actors, fast_weight=args.fast_weight)
    except (ShardReadError, ShardSchemaError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"reranker: {report['pairs']} pairs, {report['steps']} steps, fast weight "
          f"{report['fast_weight']:.2f}, loss "
          f"{report['first_loss']:.3f} -> {report['last_loss']:.3f}, "
          f"{report['fit_s']:.1f} s -> {report['out']}")
    if "fast_r1" in report:
        print(f"held-out text->image R@1 among {report['candidates']} images "
              f"({report['eval_pairs']} pairs): dual encoder {report['fast_r1']:.1f}%, "
              f"reranker {report['reranker_r1']:.1f}%")
        if report["reranker_r1"] < report["fast_r1"]:
            print("note: the reranker ranks worse than the dual encoder on these held-out pairs; "
                  "train it longer (--steps) or serve without it (reranker=none)")
    return 0
