"""`raycmr eval --checkpoint FAST --rerank SLOW`: fast, fast+slow and slow-only text->image
retrieval of a split, with time per query (the methods: :mod:`raycmr.evaluate.slow`).

The split is decoded by Ray Data and read on the driver (a quickstart split is 500 images);
the gallery side (fast image embeddings, the slow model's ``phi(x)`` rounded to float16 as an
index stores it, :func:`raycmr.models.slow.stored_phi`, and its decoders' cross-attention keys
and values, :meth:`raycmr.models.slow.SlowModel.gallery`) is computed once up front and serves
fast+slow and slow-only alike, so these rankings are the ones the Serve app answers with.

Timing: the methods take turns chunk by chunk of queries (every method on queries 0-63, then
every method on 64-127, ...), so that the varying load of a shared machine falls on all of them
alike; a method's time per query is the sum of its chunks' times over its queries.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from raycmr.config import Config, ConfigError
from raycmr.evaluate import slow as slow_eval
from raycmr.evaluate.metrics import group_pairs
from raycmr.models.slow import stored_phi

SLOW_ONLY_MAX_IMAGES = 5000  # slow-only scores every image per query: skipped above this


def split_paths(cfg: Config, split: str) -> list[str]:
    paths = cfg.data.test if split == "test" else cfg.data.val
    if not paths:
        raise ConfigError(f"the slow checkpoint's config has no data.{split} shards: "
                          f"pass data.{split}=[PATH]")
    return paths


@torch.no_grad()
def encode_split(slow, fast, cfg: Config, split: str, batch_size: int = 256) -> slow_eval.RerankSplit:
    """Decode ``split`` (the slow checkpoint's data config) and lay it out for retrieval."""
    from raycmr.data.pipeline import build_dataset, iter_worker_batches
    from raycmr.evaluate.checkpoint import has_minimal_pairs

    paths = split_paths(cfg, split)
    ds = build_dataset(paths, cfg.data, training=False)
    pairs = ("pair_group", "pair_swap") if has_minimal_pairs(paths, cfg) else ()
    cols: dict[str, list] = {k: [] for k in
                             ("phi", "ids", "mask", "group", "fimg", "ftxt", *pairs)}
    for batch, _ in iter_worker_batches(ds, batch_size, shuffle_buffer=0, seed=0,
                                        drop_last=False, extra=pairs):
        for k in pairs:
            cols[k].append(batch[k])
        cols["phi"].append(stored_phi(slow.encode_image(batch["pixel_values"])))
        cols["ids"].append(batch["input_ids"])
        cols["mask"].append(batch["attention_mask"])
        cols["group"].append(batch["group"])
        if fast is not None:
            img, txt = fast.retrieval_embed(batch)
            cols["fimg"].append(img)
            cols["ftxt"].append(txt)
    if not cols["phi"]:
        raise ConfigError(f"data.{split} has no valid rows to evaluate")
    groups = torch.cat(cols["group"]).numpy()
    image_rows, target = group_pairs(groups)
    rows = torch.as_tensor(image_rows)
    phi = torch.cat(cols["phi"])[rows]
    out = slow_eval.RerankSplit(phi, torch.cat(cols["ids"]), torch.cat(cols["mask"]), target,
                         groups=groups[image_rows],
                         gallery=slow.gallery(phi) if hasattr(slow, "gallery") else None)
    if pairs:  # minimal pairs: each image's group and kind of swap
        out.pair_group = np.concatenate(cols["pair_group"])[image_rows]
        out.pair_swap = np.concatenate(cols["pair_swap"])[image_rows]
    if fast is not None:
        out.fast_img = torch.cat(cols["fimg"])[rows]
        out.fast_txt = torch.cat(cols["ftxt"])
    return out


def fast_text_seconds(fast, split: slow_eval.RerankSplit, batch_size: int = 64) -> float:
    """Seconds per query of the fast stage's search side: encode the caption, score the
    gallery, take the top 100."""
    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(split.target), batch_size):
            batch = {"input_ids": split.input_ids[s:s + batch_size],
                     "attention_mask": split.attention_mask[s:s + batch_size]}
            txt = fast.retrieval_embed_text(batch)
            (txt @ split.fast_img.t()).topk(min(100, split.fast_img.shape[0]), dim=1)
    return (time.perf_counter() - start) / max(len(split.target), 1)


def compare(slow, split: slow_eval.RerankSplit, ks: list[int], beta: float, slow_queries: int,
            fast=None, chunk: int = 64) -> list[dict[str, Any]]:
    """One row per method: ``method``, ``k``, R@1/5/10, medr, ``ms_per_query`` (and for
    fast+slow, ``fast_recall_at_k``: the share of queries whose image is in the top K; with
    minimal-pair groups, ``group_acc``, ``group_chance``, ``group_captions`` and per kind of
    swap ``group_acc_<kind>``, over every query, :func:`raycmr.evaluate.slow.group_accuracies`).
    The methods take turns on each ``chunk`` of queries (module docstring)."""
    n_img = split.phi.shape[0]
    n_q = len(split.target)
    methods: list[tuple[str, Any, Any]] = []  # (method, k, ranks of a sub-split)
    with_fast = fast is not None and split.fast_img is not None
    if with_fast:
        methods.append(("fast", "", slow_eval.fast_ranks))
        for k in ks:
            kk = min(k, n_img) if k > 0 else n_img
            methods.append(("fast+slow", kk,
                            lambda sub, kk=kk: slow_eval.rerank_ranks(slow, sub, kk, beta)))
    slow_only = bool(slow_queries) and n_img <= SLOW_ONLY_MAX_IMAGES
    if slow_only:
        methods.append(("slow-only", n_img, lambda sub: slow_eval.slow_only_ranks(slow, sub)))
    ranks: list[list[np.ndarray]] = [[] for _ in methods]
    seconds = [0.0 for _ in methods]
    fast_s = 0.0
    for s in range(0, n_q, chunk):
        sub = split.rows(s, min(s + chunk, n_q))
        if with_fast:
            fast_s += fast_text_seconds(fast, sub) * len(sub.target)
        for i, (method, _, fn) in enumerate(methods):
            if method == "slow-only":
                if s >= slow_queries:
                    continue
                sub_i = sub.head(min(len(sub.target), slow_queries - s))
            else:
                sub_i = sub
            got, sec = slow_eval.timed(fn, sub_i)
            ranks[i].append(got)
            seconds[i] += sec
    rows: list[dict[str, Any]] = []
    fast_r = np.concatenate(ranks[0]) if with_fast else None
    for i, (method, k, _) in enumerate(methods):
        r = np.concatenate(ranks[i])
        row = {"method": method, "k": k, **slow_eval.summary(r, "t2i"), "queries": len(r)}
        if method == "fast":
            row["ms_per_query"] = 1000 * fast_s / n_q
        elif method == "fast+slow":
            row["ms_per_query"] = 1000 * (fast_s + seconds[i]) / n_q
            row["fast_recall_at_k"] = slow_eval.recall_at(fast_r, k)
        else:
            row["ms_per_query"] = 1000 * seconds[i] / len(r)
        rows.append(row)
    if split.pair_group is not None:  # untimed: a group's images only
        ks_used = [k for method, k, _ in methods if method == "fast+slow"]
        acc = slow_eval.group_accuracies(slow, split, ks_used, beta, with_fast)
        for row in rows:
            row.update(acc.get((row["method"], row["k"]), {}))
    return rows


def evaluate_fast_slow(fast_checkpoint: str | None, slow_checkpoint: str, split: str,
                       ks: list[int], beta: float, slow_queries: int,
                       overrides: list[str] | None = None,
                       queries: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The comparison rows and the gallery size of ``split`` (``queries`` > 0: only the first
    that many captions query, for every method)."""
    from raycmr.artifacts import load_exported, load_slow_exported
    from raycmr.runtime import init_ray

    slow, cfg = load_slow_exported(slow_checkpoint)
    if overrides:
        from raycmr.config import apply_overrides

        cfg = apply_overrides(cfg, overrides)
    fast = None
    if fast_checkpoint:
        fast, fast_cfg = load_exported(fast_checkpoint)
        if (fast_cfg.data.image_size, fast_cfg.data.tokenizer) != \
                (cfg.data.image_size, cfg.data.tokenizer):
            raise ConfigError("the fast and slow checkpoints read images or captions "
                              "differently (data.image_size / data.tokenizer): train both on "
                              "the same data config")
    init_ray(min_cpus=2)
    with torch.no_grad():
        data = encode_split(slow, fast, cfg, split)
        if queries > 0:
            data = data.head(queries)
        return compare(slow, data, ks, beta, slow_queries, fast), int(data.phi.shape[0])


def group_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The group-accuracy keys some row carries: ``group_acc`` then ``group_acc_<kind>``."""
    keys = {k for r in rows for k in r if k.startswith("group_acc")}
    return sorted(keys, key=lambda k: (k != "group_acc", k))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table; with minimal pairs, group-accuracy columns (all captions,
    then per kind of swap) and a last line with their chance levels."""
    groups = group_columns(rows)
    names = ["group acc" if k == "group_acc" else k[len("group_acc_"):] for k in groups]
    head = "| method | K | R@1 | R@5 | R@10 | medr | fast R@K | ms / query | queries |"
    head += "".join(f" {n} |" for n in names)
    lines = [head, "|" + " --- |" * (9 + len(groups))]
    for r in rows:
        fast_k = f"{r['fast_recall_at_k']:.1f}" if "fast_recall_at_k" in r else ""
        lines.append(f"| {r['method']} | {r['k']} | {r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} | "
                     f"{r['t2i_r10']:.1f} | {r['t2i_medr']:.0f} | {fast_k} | "
                     f"{r['ms_per_query']:.2f} | {r['queries']} |"
                     + "".join(f" {r[k]:.1f} |" if k in r else " |" for k in groups))
    first = next((r for r in rows if "group_acc" in r), None)
    if first is not None:
        chance = ", ".join(f"{n} {first[k.replace('_acc', '_chance')]:.1f}%"
                           for n, k in zip(names, groups))
        lines.append(f"\ngroup acc: % of {int(first['group_captions'])} captions (every "
                     f"caption, whatever the queries column) whose own image ranks strictly "
                     f"above every other image of its minimal-pair group; chance: {chance}")
    return "\n".join(lines)

