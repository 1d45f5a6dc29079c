"""DCKT progressive-transfer selection: per-pair AP and selection probabilities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raycmr.train.dckt.selection import (
    pair_average_precision,
    select_pairs,
    selection_probabilities,
)


def test_pair_average_precision_hand_example() -> None:
    # labels 0, 0, 1. Rankings (cosine) worked out by hand:
    #  i0 -> t0 t2 t1: rel 1 0 1 -> AP 5/6     t0 -> i0 i2 i1: rel 1 0 1 -> 5/6
    #  i1 -> t1 t2 t0: rel 1 0 1 -> AP 5/6     t1 -> i2 i1 i0: rel 0 1 1 -> (1/2 + 2/3)/2 = 7/12
    #  i2 -> t1 t2 t0: rel 0 1 0 -> AP 1/2     t2 -> i0 i2 i1: rel 0 1 0 -> 1/2
    img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = np.array([[1.0, 0.0], [0.6, 0.8], [0.96, 0.28]])
    ap = pair_average_precision(img, txt, np.array([0, 0, 1]))
    np.testing.assert_allclose(ap, [5 / 6, (5 / 6 + 7 / 12) / 2, 1 / 2], rtol=0, atol=1e-12)


def _ap_loop(q: np.ndarray, gallery: np.ndarray, rel: list[bool]) -> float:
    sims = [float(q @ g) / (np.linalg.norm(q) * np.linalg.norm(g)) for g in gallery]
    order = sorted(range(len(gallery)), key=lambda j: -sims[j])
    hits, total = 0, 0.0
    for rank, j in enumerate(order, start=1):
        if rel[j]:
            hits += 1
            total += hits / rank
    return total / hits


def test_pair_average_precision_matches_loop_reference() -> None:
    rng = np.random.default_rng(0)
    n = 12
    labels = rng.integers(0, 3, size=n)
    img, txt = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
    ref = []
    for q in range(n):
        rel = [labels[j] == labels[q] for j in range(n)]
        ref.append((_ap_loop(img[q], txt, rel) + _ap_loop(txt[q], img, rel)) / 2)
    np.testing.assert_allclose(pair_average_precision(img, txt, labels), ref, rtol=0, atol=1e-9)


AP = np.array([0.8, 0.6, 0.4, 0.2, 0.0])


@pytest.mark.parametrize(
    ("round_idx", "expected"),
    [
        # 1 - (0.8 - AP) / (0.8 * iter), capped at alpha = 0.9
        (1, [0.9, 0.75, 0.5, 0.25, 0.0]),
        (2, [0.9, 0.875, 0.75, 0.625, 0.5]),
        (3, [0.9, 0.9, 1 - 0.4 / 2.4, 1 - 0.6 / 2.4, 1 - 0.8 / 2.4]),
    ],
)
def test_selection_probabilities_hand_values(round_idx: int, expected: list[float]) -> None:
    got = selection_probabilities(AP, round_idx, alpha=0.9)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_selection_drifts_toward_uniform_and_is_capped() -> None:
    spreads = [np.ptp(selection_probabilities(AP, r, alpha=0.95)) for r in range(1, 8)]
    assert all(a > b for a, b in itertools.pairwise(spreads))
    np.testing.assert_array_equal(selection_probabilities(AP, 100, alpha=0.95), np.full(5, 0.95))
    low = selection_probabilities(AP, 1, alpha=0.3)
    np.testing.assert_allclose(low, [0.3, 0.3, 0.3, 0.25, 0.0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(selection_probabilities(np.zeros(3), 2, 0.8), np.full(3, 0.8))
    with pytest.raises(ValueError, match="counts from 1"):
        selection_probabilities(AP, 0, alpha=0.8)


def test_select_pairs_bernoulli_frequencies() -> None:
    probs = np.array([0.0, 1.0, 0.3])
    rng = np.random.default_rng(1)
    draws = np.stack([select_pairs(probs, rng) for _ in range(20_000)])
    assert draws.dtype == bool
    assert not draws[:, 0].any() and draws[:, 1].all()
    # 4 standard errors of a Bernoulli(0.3) mean over 20k draws: 4 * sqrt(0.21 / 20000) = 0.013
    assert abs(draws[:, 2].mean() - 0.3) < 0.013
    a = select_pairs(np.full(50, 0.5), np.random.default_rng(9))
    b = select_pairs(np.full(50, 0.5), np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)
