"""Fast, fast+slow and slow-only text->image ranks against an explicit sort of each query's
final ordering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycmr.evaluate import slow as slow_eval


class TableScorer:
    """A slow scorer whose h(x_n, y_q) is ``table[q, n]``: the gallery's ``phi`` holds each
    image's row number and every query caption its query number, so the lookup goes through
    the same gathers that a real model's candidate tensors go through."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def score_candidates(self, memory, input_ids, attention_mask):
        if memory.dim() == 3:
            memory = memory.unsqueeze(0).expand(input_ids.shape[0], -1, -1, -1)
        image = memory[..., 0, 0].long()  # [Q, K]
        query = input_ids[:, 0].long()[:, None].expand_as(image)
        return self.table[query, image]


def _split(q: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fast_img = torch.randn(n, 8, generator=gen)
    fast_txt = torch.randn(q, 8, generator=gen)
    table = torch.randn(q, n, generator=gen) * 3
    split = slow_eval.RerankSplit(
        phi=torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 4).clone(),
        input_ids=torch.arange(q)[:, None].expand(q, 5).clone(),
        attention_mask=torch.ones(q, 5, dtype=torch.long),
        target=torch.randint(0, n, (q,), generator=gen).numpy(),
        fast_img=fast_img, fast_txt=fast_txt)
    return split, TableScorer(table)


def _reference_rank(fast: list[float], slow: list[float], target: int, k: int,
                    beta: float) -> int:
    order = sorted(range(len(fast)), key=lambda n: -fast[n])
    top, rest = order[:k], order[k:]
    top = sorted(top, key=lambda n: -(slow[n] + beta * fast[n]))
    return (top + rest).index(target) + 1


@pytest.mark.parametrize("k,beta", [(1, 0.0), (3, 0.0), (5, 0.5), (12, 2.0)])
def test_rerank_ranks_match_explicit_reordering(k: int, beta: float) -> None:
    split, scorer = _split(q=9, n=12)
    fast = (split.fast_txt @ split.fast_img.t()).tolist()
    expected = [_reference_rank(fast[i], scorer.table[i].tolist(), int(split.target[i]), k, beta)
                for i in range(9)]
    got = slow_eval.rerank_ranks(scorer, split, k, beta, queries_per_call=4)
    assert got.tolist() == expected


def test_fast_and_slow_only_ranks() -> None:
    split, scorer = _split(q=7, n=10, seed=3)
    fast = split.fast_txt @ split.fast_img.t()
    for name, scores, got in (("fast", fast, slow_eval.fast_ranks(split)),
                              ("slow", scorer.table, slow_eval.slow_only_ranks(scorer, split, 3))):
        expected = [sorted(range(10), key=lambda n, r=row: -float(r[n])).index(int(t)) + 1
                    for row, t in zip(scores, split.target)]
        assert got.tolist() == expected, name
    # re-ranking every image with beta 0 is slow-only
    assert slow_eval.rerank_ranks(scorer, split, 10).tolist() == \
        slow_eval.slow_only_ranks(scorer, split).tolist()


def test_ties_count_against_the_target() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
    assert slow_eval.target_ranks(scores, torch.tensor([0, 2])).tolist() == [3, 2]


def test_summary_by_hand() -> None:
    ranks = np.array([1, 2, 7, 11, 1])
    assert slow_eval.summary(ranks, "t2i") == {"t2i_r1": 40.0, "t2i_r5": 60.0, "t2i_r10": 80.0,
                                        "t2i_medr": 2.0}
    assert slow_eval.recall_at(ranks, 7) == 80.0


@pytest.mark.parametrize("k,beta,n", [(3, 0.0, 6), (5, 0.5, 12), (12, 2.0, 4)])
def test_reranked_rows_are_the_explicit_reordering(k: int, beta: float, n: int) -> None:
    """The ranking the Serve app must return (served top ``n``): the fast top-k by
    ``h + beta * fast``, then the rest in fast order."""
    split, scorer = _split(q=5, n=12, seed=7)
    fast = (split.fast_txt @ split.fast_img.t()).tolist()
    got = slow_eval.reranked_rows(scorer, split, slice(0, 5), k, beta, n)
    for i in range(5):
        order = sorted(range(12), key=lambda m, f=fast[i]: -f[m])
        top = sorted(order[:k], key=lambda m, f=fast[i]: -(float(scorer.table[i, m])
                                                          + beta * f[m]))
        assert got[i].tolist() == (top + order[k:])[:n]


def test_combine_and_rerank_order() -> None:
    h, fast = torch.tensor([[-3.0, -1.0, -2.0, -1.0]]), torch.tensor([[0.9, 0.1, 0.5, 0.1]])
    assert slow_eval.combine(h, fast, 2.0).tolist() == [[-1.2000000476837158, -0.800000011920929,
                                                  -1.0, -0.800000011920929]]
    assert slow_eval.rerank_order(slow_eval.combine(h, fast, 0.0)).tolist() == [[1, 3, 2, 0]]  # ties: stable
    assert slow_eval.rerank_order(slow_eval.combine(h, fast, 2.0)).tolist() == [[1, 3, 2, 0]]
    assert slow_eval.rerank_order(slow_eval.combine(h, fast, 10.0)).tolist() == [[0, 2, 1, 3]]


class TableFast:
    """A fast text encoder returning the split's own query embeddings (query number in ids)."""

    def __init__(self, fast_txt: torch.Tensor):
        self.fast_txt = fast_txt

    def retrieval_embed_text(self, batch):
        return self.fast_txt[batch["input_ids"][:, 0]]


def test_compare_taking_turns_by_chunk_equals_whole_split_ranks() -> None:
    from raycmr.evaluate.fast_slow import compare

    split, scorer = _split(q=11, n=12, seed=4)
    rows = compare(scorer, split, [3, 0], beta=0.5, slow_queries=7,
                   fast=TableFast(split.fast_txt), chunk=4)
    by = {(r["method"], r["k"]): r for r in rows}
    assert set(by) == {("fast", ""), ("fast+slow", 3), ("fast+slow", 12), ("slow-only", 12)}
    fast = slow_eval.fast_ranks(split)
    assert by[("fast", "")]["t2i_r1"] == slow_eval.summary(fast, "t2i")["t2i_r1"]
    for k in (3, 12):
        want = slow_eval.summary(slow_eval.rerank_ranks(scorer, split, k, 0.5), "t2i")
        assert {m: by[("fast+slow", k)][m] for m in want} == want
        assert by[("fast+slow", k)]["fast_recall_at_k"] == slow_eval.recall_at(fast, k)
        assert by[("fast+slow", k)]["queries"] == 11
    # slow-only on the first 7 queries only (chunks 0-3 and 4-6)
    want = slow_eval.summary(slow_eval.slow_only_ranks(scorer, split.head(7)), "t2i")
    assert {m: by[("slow-only", 12)][m] for m in want} == want
    assert by[("slow-only", 12)]["queries"] == 7
    assert all(r["ms_per_query"] > 0 for r in rows)
