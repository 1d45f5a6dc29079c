"""Text->image retrieval with a fast and a slow stage (Miech et al., CVPR 2021, section 3.3).

For every query caption ``y`` of a split, against the split's unique images:

- fast:      rank by the dual encoder's dot product ``f(x)^T g(y)``;
- fast+slow: take the fast top-K, re-rank them by ``h(x, y) + beta * f(x)^T g(y)`` (``h``: the
  slow model's caption log-likelihood, :class:`raycmr.models.slow.SlowModel`; :func:`combine`);
  images outside the top-K keep their fast rank (all K re-ranked images stay ahead of them);
  ties keep the fast order. The Serve app ranks with the same :func:`combine` and
  :func:`rerank_order` (``raycmr/serve/scoring.py``);
- slow-only: rank every image by ``h(x, y)``.

With minimal-pair groups (:func:`group_accuracies`): each method's group accuracy, the share of
captions whose own image it ranks strictly above every other image of the caption's group.

Ranks are 1-based; a tie counts against the target (``1 + #{scores > target's}`` would favour
it, so ties with the target add their count): a model that scores everything equal ranks the
target last, not first. Gallery-side work (image embeddings, ``phi(x)`` and, with a
``gallery`` from :meth:`raycmr.models.slow.SlowModel.gallery`, the decoders' cross-attention
keys and values of it) is index-time and not timed; each method's time per query covers what a
query costs at search time. With a ``gallery`` both slow methods score through
``slow.score_gallery`` (the caption's image-free work once per query, then only the K pairs);
without one, through ``slow.score_candidates`` of the gathered ``phi``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


@dataclass
class RerankSplit:
    """A split laid out for text->image retrieval: ``phi`` and ``fast_img`` have one row per
    unique image, the caption tensors one row per query, ``target`` the query's image row."""

    phi: torch.Tensor  # [N, P, w] the slow model's spatial tokens
    input_ids: torch.Tensor  # [Q, T]
    attention_mask: torch.Tensor  # [Q, T]
    target: np.ndarray  # [Q]
    fast_img: torch.Tensor | None = None  # [N, d]
    fast_txt: torch.Tensor | None = None  # [Q, d]
    groups: np.ndarray | None = None  # [N] the image's ``group`` (hash of its id)
    gallery: Any = None  # SlowGallery of phi (index-time caches), or None
    pair_group: np.ndarray | None = None  # [N] the image's minimal-pair group (minimal pairs)
    pair_swap: np.ndarray | None = None  # [N] its group's kind of swap

    def head(self, queries: int) -> RerankSplit:
        """The first ``queries`` queries against the same gallery."""
        return self.rows(0, queries)

    def rows(self, start: int, stop: int) -> RerankSplit:
        """Queries ``start`` .. ``stop - 1`` against the same gallery."""
        q = slice(start, stop)
        return RerankSplit(self.phi, self.input_ids[q], self.attention_mask[q], self.target[q],
                           self.fast_img, None if self.fast_txt is None else self.fast_txt[q],
                           self.groups, self.gallery, self.pair_group, self.pair_swap)


def _slow_scores(slow, split: RerankSplit, candidates: torch.Tensor, s: int,
                 n: int) -> torch.Tensor:
    """h of queries ``s .. s + n - 1`` against their candidate rows [n, K]."""
    ids, mask = split.input_ids[s:s + n], split.attention_mask[s:s + n]
    if split.gallery is not None:
        return slow.score_gallery(split.gallery, candidates, ids, mask)
    return slow.score_candidates(split.phi[candidates], ids, mask)


def combine(h: torch.Tensor, fast: torch.Tensor, beta: float) -> torch.Tensor:
    """The fast+slow score ``s(x, y) = h(x, y) + beta * f(x)^T g(y)`` (section 3.3)."""
    return h + beta * fast


def rerank_order(final: torch.Tensor) -> torch.Tensor:
    """Positions of each row's candidates by descending ``final`` score, ties in candidate
    (fast) order: ``[..., K]`` -> ``[..., K]``."""
    return torch.sort(final, dim=-1, descending=True, stable=True).indices


@torch.no_grad()
def rerank_head(slow, split: RerankSplit, queries: slice, k: int, beta: float):
    """For the queries ``queries``: ``(fast [q, N], top [q, k], h [q, k], final [q, k])``, the
    fast scores of every image, the fast top-``k`` image rows (fast order), their slow scores
    and their fast+slow scores."""
    fast = split.fast_txt[queries] @ split.fast_img.t()
    top = fast.topk(min(k, fast.shape[1]), dim=1).indices  # [q, k]
    h = _slow_scores(slow, split, top, queries.start or 0, top.shape[0])
    return fast, top, h, combine(h, fast.gather(1, top), beta)


@torch.no_grad()
def reranked_rows(slow, split: RerankSplit, queries: slice, k: int, beta: float, n: int
                  ) -> np.ndarray:
    """The fast+slow ranking's first ``n`` image rows of each query ``[q, n]``: the fast top-``k``
    re-ranked by ``h + beta * fast``, then the rest in fast order."""
    fast, top, _, final = rerank_head(slow, split, queries, k, beta)
    head = top.gather(1, rerank_order(final))
    tail = fast.argsort(dim=1, descending=True, stable=True)[:, : max(n - k, 0) + k]
    rows = []
    for h, t in zip(head.tolist(), tail.tolist()):
        seen = set(h)
        rows.append((h + [r for r in t if r not in seen])[:n])
    return np.asarray(rows, dtype=np.int64)


def target_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``scores[q, target[q]]`` in each row; ties count against the target."""
    own = scores.gather(1, target[:, None])
    return (scores > own).sum(1) + (scores == own).sum(1)


def summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """``{prefix}_r1/_r5/_r10`` (percent) and ``{prefix}_medr`` of text->image ranks."""
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
    return out


@torch.no_grad()
def fast_ranks(split: RerankSplit) -> np.ndarray:
    scores = split.fast_txt @ split.fast_img.t()
    return target_ranks(scores, torch.as_tensor(split.target, device=scores.device)).cpu().numpy()


@torch.no_grad()
def rerank_ranks(slow, split: RerankSplit, k: int, beta: float = 0.0,
                 queries_per_call: int = 64) -> np.ndarray:
    """Ranks after re-ranking each query's fast top-``k`` by ``h + beta * fast``; at most
    ``queries_per_call`` queries per slow-model call (each call has a fixed cost of a few
    hundred small operators, which a loaded 2-core machine makes tens of milliseconds)."""
    target = torch.as_tensor(split.target, device=split.phi.device)
    ranks = []
    for s in range(0, len(target), queries_per_call):
        fast, top, _, final = rerank_head(slow, split, slice(s, s + queries_per_call), k, beta)
        tgt = target[s:s + queries_per_call]
        fast_rank = target_ranks(fast, tgt)
        inside = top == tgt[:, None]
        own = torch.where(inside, final, torch.full_like(final, -torch.inf)).max(1).values
        slow_rank = (final > own[:, None]).sum(1) + (final == own[:, None]).sum(1)
        ranks.append(torch.where(inside.any(1), slow_rank, fast_rank))
    return torch.cat(ranks).cpu().numpy()


@torch.no_grad()
def slow_only_ranks(slow, split: RerankSplit, queries_per_call: int = 8) -> np.ndarray:
    """Ranks by ``h`` over the whole gallery."""
    target = torch.as_tensor(split.target, device=split.phi.device)
    ranks = []
    n_img = split.phi.shape[0]
    for s in range(0, len(target), queries_per_call):
        n = len(target[s:s + queries_per_call])
        if split.gallery is not None:
            h = _slow_scores(slow, split, torch.arange(n_img, device=target.device).expand(n, -1),
                             s, n)
        else:  # every query against the same phi: no gather
            h = slow.score_candidates(split.phi, split.input_ids[s:s + n],
                                      split.attention_mask[s:s + n])
        ranks.append(target_ranks(h, target[s:s + queries_per_call]))
    return torch.cat(ranks).cpu().numpy()


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percent of queries whose image is in the top ``k``: the fast stage's ceiling at K."""
    return float(100.0 * np.mean(ranks <= k))


# ------------------------------------------------------------------------ minimal-pair groups


def group_members(pair_group: np.ndarray) -> np.ndarray:
    """For each image row, the rows of its minimal-pair group (itself included, ascending),
    padded with -1: ``[N, G]``, G the size of the largest group."""
    pair_group = np.asarray(pair_group)
    order = np.argsort(pair_group, kind="stable")
    _, start, counts = np.unique(pair_group[order], return_index=True, return_counts=True)
    out = np.full((len(pair_group), int(counts.max(initial=1))), -1, dtype=np.int64)
    for s, c in zip(start, counts):
        rows = np.sort(order[s:s + c])
        out[np.ix_(rows, np.arange(c))] = rows
    return out


def group_right(scores: torch.Tensor, own: torch.Tensor, valid: torch.Tensor,
                in_top: torch.Tensor | None = None) -> torch.Tensor:
    """``[Q]``: whether each query's own candidate (``own`` [Q, G], one True per row) is ranked
    strictly above every other ``valid`` candidate by ``scores`` [Q, G]. With ``in_top`` [Q, G]
    (fast+slow), candidates inside the re-ranked top-K come before those outside it and
    ``scores`` compare candidates on the same side only; ties count against the own image."""
    pick = own.float().argmax(1, keepdim=True)
    beats = scores.gather(1, pick) > scores
    if in_top is not None:
        top_own = in_top.gather(1, pick)
        beats = (top_own & ~in_top) | ((top_own == in_top) & beats)
    return (beats | own | ~valid).all(1)


@torch.no_grad()
def group_accuracies(slow, split: RerankSplit, ks: list[int], beta: float, with_fast: bool,
                     chunk: int = 64) -> dict[tuple[str, Any], dict[str, float]]:
    """Minimal-pair group accuracy of every query of ``split`` (``split.pair_group`` set), as
    :func:`raycmr.evaluate.metrics.group_summary` reports it, keyed like :func:`compare`'s rows:
    ``("slow-only", N)``, and with the fast stage ``("fast", "")`` and ``("fast+slow", k)``
    for each ``k`` in ``ks``. A group's images keep the order the full ranking gives them, so
    only they need a slow score: slow-only by ``h``; fast+slow puts those inside the fast top-K
    first, ordered by ``h + beta * fast``, then the rest by ``fast``. Groups of one image are
    skipped."""
    from raycmr.evaluate.metrics import group_summary

    target = torch.as_tensor(split.target)
    members = torch.as_tensor(group_members(split.pair_group))[target]  # [Q, G]
    valid, own = members >= 0, members == target[:, None]
    cand = members.clamp(min=0)
    keys: list[tuple[str, Any]] = [("slow-only", int(split.phi.shape[0]))]
    if with_fast:
        keys += [("fast", "")] + [("fast+slow", k) for k in ks]
    right: dict[tuple[str, Any], list[torch.Tensor]] = {key: [] for key in keys}
    for s in range(0, len(target), chunk):
        q = slice(s, s + chunk)
        c, o, v = cand[q], own[q], valid[q]
        h = _slow_scores(slow, split, c, s, c.shape[0])
        right[keys[0]].append(group_right(h, o, v))
        if with_fast:
            fast = split.fast_txt[q] @ split.fast_img.t()
            f = fast.gather(1, c)
            right[("fast", "")].append(group_right(f, o, v))
            for k in ks:
                top = fast.topk(min(k, fast.shape[1]), dim=1).indices
                in_top = (c[:, :, None] == top[:, None, :]).any(2)
                final = torch.where(in_top, combine(h, f, beta), f)
                right[("fast+slow", k)].append(group_right(final, o, v, in_top))
    keep = (valid.sum(1) >= 2).numpy()
    chance = (1.0 / valid.sum(1).double()).numpy()[keep]
    kind = None if split.pair_swap is None else np.asarray(split.pair_swap)[split.target][keep]
    return {key: group_summary(torch.cat(r).numpy()[keep], chance, kind)
            for key, r in right.items()}
