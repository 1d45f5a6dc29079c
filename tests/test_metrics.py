"""Retrieval metrics against hand-computed cases and independent brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycmr.evaluate.metrics import (
    average_precision_per_query,
    group_pairs,
    map_both_ways,
    mean_average_precision,
    retrieval_metrics,
    retrieval_ranks,
)

# ------------------------------------------------------------------ R@K / medr / meanr by hand

# 3 images x 2 captions. Images are the standard basis of R^3, so s(i, j) = txt[j][i]: the
# similarity matrix is just the caption matrix transposed. Rows = images, columns = captions
# c0..c5; captions c0,c1 -> img0, c2,c3 -> img1, c4,c5 -> img2.
#
#            c0   c1   c2   c3   c4   c5
#   img0    0.9  0.1  0.5  0.2  0.3  0.0
#   img1    0.8  0.4  0.3  0.7  0.1  0.2
#   img2    0.2  0.6  0.9  0.1  0.4  0.5
#
# image -> text (best rank among own captions):
#   img0: order c0 c2 c4 c3 c1 c5            -> own c0 at 1, c1 at 5       -> rank 1
#   img1: order c0 c3 c1 c2 c5 c4            -> own c3 at 2, c2 at 4       -> rank 2
#   img2: order c2 c1 c5 c4 c0 c3            -> own c5 at 3, c4 at 4       -> rank 3
#   ranks [1, 2, 3]: R@1 = 100/3, R@5 = R@10 = 100, medr = 2, meanr = 2
# text -> image (rank of the caption's image among the column):
#   c0 (0.9, 0.8, 0.2) img0 -> 1;  c1 (0.1, 0.4, 0.6) img0 -> 3;  c2 (0.5, 0.3, 0.9) img1 -> 3
#   c3 (0.2, 0.7, 0.1) img1 -> 1;  c4 (0.3, 0.1, 0.4) img2 -> 1;  c5 (0.0, 0.2, 0.5) img2 -> 1
#   ranks [1, 3, 3, 1, 1, 1]: R@1 = 400/6, R@5 = R@10 = 100, medr = 1, meanr = 10/6
# rsum = 100/3 + 100 + 100 + 400/6 + 100 + 100 = 500
SIM = np.array(
    [
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],
        [0.8, 0.4, 0.3, 0.7, 0.1, 0.2],
        [0.2, 0.6, 0.9, 0.1, 0.4, 0.5],
    ],
    dtype=np.float32,
)
IMG = np.eye(3, dtype=np.float32)
TXT = SIM.T.copy()
TXT_TO_IMG = np.array([0, 0, 1, 1, 2, 2])


def test_hand_case_ranks_and_metrics() -> None:
    i2t, t2i = retrieval_ranks(IMG, TXT, TXT_TO_IMG)
    assert i2t.tolist() == [1, 2, 3]
    assert t2i.tolist() == [1, 3, 3, 1, 1, 1]
    m = retrieval_metrics(IMG, TXT, TXT_TO_IMG)
    expected = {
        "i2t_r1": 100 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 2.0, "i2t_meanr": 2.0,
        "t2i_r1": 400 / 6, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 1.0,
        "t2i_meanr": 10 / 6, "rsum": 500.0,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key


def test_blockwise_equals_single_block_and_torch_input() -> None:
    full = retrieval_metrics(IMG, TXT, TXT_TO_IMG)
    for block in (1, 4, 7):  # one score at a time, partial rows, ...
        assert retrieval_metrics(IMG, TXT, TXT_TO_IMG, block_elems=block) == full
    assert retrieval_metrics(torch.from_numpy(IMG), torch.from_numpy(TXT),
                             torch.from_numpy(TXT_TO_IMG)) == full


def test_ties_are_broken_by_index_stable_sort() -> None:
    # All embeddings equal: every score ties, so the rank of candidate j is j + 1.
    # 2 images x 2 captions (c0,c1 -> img0; c2,c3 -> img1).
    # i2t: img0's best own caption is c0 -> rank 1; img1's is c2 -> rank 3.
    # t2i: c0,c1 -> img0 rank 1; c2,c3 -> img1 rank 2; ranks [1,1,2,2], median 1.5 -> medr 1
    # (VSE++ floor convention), meanr 1.5.
    img = np.ones((2, 4), dtype=np.float32) / 2
    txt = np.ones((4, 4), dtype=np.float32) / 2
    t2i_map = np.array([0, 0, 1, 1])
    i2t, t2i = retrieval_ranks(img, txt, t2i_map)
    assert i2t.tolist() == [1, 3]
    assert t2i.tolist() == [1, 1, 2, 2]
    m = retrieval_metrics(img, txt, t2i_map)
    assert m["i2t_r1"] == 50.0 and m["i2t_medr"] == 2.0 and m["i2t_meanr"] == 2.0
    assert m["t2i_r1"] == 50.0 and m["t2i_medr"] == 1.0 and m["t2i_meanr"] == 1.5


def _brute_force_ranks(img: np.ndarray, txt: np.ndarray, t2i_map: np.ndarray):
    sim = img.astype(np.float64) @ txt.astype(np.float64).T
    i2t = []
    for i in range(sim.shape[0]):
        order = np.argsort(-sim[i], kind="stable").tolist()
        i2t.append(min(order.index(j) + 1 for j in np.flatnonzero(t2i_map == i)))
    t2i = []
    for j in range(sim.shape[1]):
        order = np.argsort(-sim[:, j], kind="stable").tolist()
        t2i.append(order.index(t2i_map[j]) + 1)
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("quantised", [False, True])
def test_ranks_match_brute_force(quantised: bool) -> None:
    rng = np.random.default_rng(1)
    n_img, per, d = 40, 5, 8
    img = rng.standard_normal((n_img, d))
    txt = np.repeat(img, per, axis=0) * 0.3 + rng.standard_normal((n_img * per, d))
    if quantised:  # small integers: many exact ties, exercising the tie rule
        img, txt = np.round(img).clip(-1, 1), np.round(txt).clip(-1, 1)
    t2i_map = np.repeat(np.arange(n_img), per)
    perm = rng.permutation(n_img * per)  # captions need not be grouped by image
    txt, t2i_map = txt[perm], t2i_map[perm]
    # float64 input is kept in float64, so the brute-force comparison is exact.
    i2t, t2i = retrieval_ranks(img, txt, t2i_map, block_elems=333)
    ref_i2t, ref_t2i = _brute_force_ranks(img, txt, t2i_map)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)
    m = retrieval_metrics(img, txt, t2i_map)
    assert m["t2i_r5"] == pytest.approx(100 * np.mean(ref_t2i <= 5))
    assert m["i2t_meanr"] == pytest.approx(ref_i2t.mean())
    assert m["i2t_medr"] == np.floor(np.median(ref_i2t))


def test_perfect_embeddings_give_rsum_600() -> None:
    rng = np.random.default_rng(0)
    img = rng.standard_normal((50, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = np.repeat(img, 5, axis=0)
    m = retrieval_metrics(img, txt, np.repeat(np.arange(50), 5))
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0


def test_retrieval_errors() -> None:
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(IMG, TXT[:, :2], TXT_TO_IMG)
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_metrics(IMG, TXT, TXT_TO_IMG[:5])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(IMG, TXT, np.array([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(IMG, TXT, np.array([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(IMG[:0], TXT, TXT_TO_IMG)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(IMG * np.nan, TXT, TXT_TO_IMG)


def test_group_pairs() -> None:
    rows, t2i_map = group_pairs(np.array([7, 7, 3, 9, 3]))
    assert rows.tolist() == [0, 2, 3]  # first pair of image 7, of 3, of 9
    assert t2i_map.tolist() == [0, 0, 1, 2, 1]
    rows, t2i_map = group_pairs(["b", "a", "b"])
    assert rows.tolist() == [0, 1] and t2i_map.tolist() == [0, 1, 0]
    # Pair-wise embeddings -> metrics: pairs (img0,c0) (img0,c1) (img1,c2) ... as in the hand case.
    pair_img = IMG[TXT_TO_IMG]
    rows, t2i_map = group_pairs(np.array([10, 10, 11, 11, 12, 12]))
    assert retrieval_metrics(pair_img[rows], TXT, t2i_map)["rsum"] == pytest.approx(500.0)


# -------------------------------------------------------------------------------------- mAP


def test_average_precision_by_hand() -> None:
    # Gallery at angles 0, 10, 20, 30 degrees; query along 0 degrees: cosine ranks g0 g1 g2 g3.
    # Gallery vectors are scaled by arbitrary norms: cosine ranking must ignore them.
    ang = np.deg2rad([0.0, 10.0, 20.0, 30.0])
    gallery = np.stack([np.cos(ang), np.sin(ang)], axis=1) * np.array([[3.0], [0.5], [2.0], [7.0]])
    query = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    g_labels = np.array([1, 0, 1, 0])
    # query 0, label 1: relevance [1,0,1,0] -> AP = (1/1 + 2/3) / 2 = 5/6
    # query 1, label 0: relevance [0,1,0,1] -> AP = (1/2 + 2/4) / 2 = 1/2
    # query 2, label 5: no relevant item -> AP = 0
    q_labels = np.array([1, 0, 5])
    ap = average_precision_per_query(query, gallery, q_labels, g_labels)
    np.testing.assert_allclose(ap, [5 / 6, 1 / 2, 0.0], rtol=1e-12)
    assert mean_average_precision(query, gallery, q_labels, g_labels) == pytest.approx(4 / 9)
    # top-2 only: [1,0] -> 1/1 over 1 hit = 1; [0,1] -> (1/2) over 1 hit = 1/2
    ap2 = average_precision_per_query(query, gallery, q_labels, g_labels, k=2)
    np.testing.assert_allclose(ap2, [1.0, 0.5, 0.0], rtol=1e-12)
    # multi-hot labels: relevant = shares a class. Query classes {0,1}: everything relevant.
    g_multi = np.eye(2)[g_labels]
    ap_multi = average_precision_per_query(query[:1], gallery, np.array([[1, 1]]), g_multi)
    np.testing.assert_allclose(ap_multi, [1.0])


def test_average_precision_ties_are_stable() -> None:
    # All gallery items tie: stable order g0 g1 g2; relevance [0,1,1] -> AP = (1/2 + 2/3) / 2.
    gallery = np.ones((3, 2))
    ap = average_precision_per_query(np.ones((1, 2)), gallery, np.array([1]), np.array([0, 1, 1]))
    assert ap[0] == pytest.approx((1 / 2 + 2 / 3) / 2)


def ap_by_loop(scores, ql, gl, k=None):
    """AP of every query row of ``scores`` [n_q][n_g] by explicit loops: rank descending, ties
    in gallery order, precision at each relevant rank averaged over the relevant retrieved."""
    aps = []
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        if k is not None:
            order = order[:k]
        hits, total = 0, 0.0
        for pos, j in enumerate(order, start=1):
            if gl[j] == ql[i]:
                hits += 1
                total += hits / pos
        aps.append(total / hits if hits else 0.0)
    return np.array(aps)


def _brute_force_ap(q, g, ql, gl, k=None):
    sims = [[float(q[i] @ g[j] / (np.linalg.norm(q[i]) * np.linalg.norm(g[j])))
             for j in range(g.shape[0])] for i in range(q.shape[0])]
    return ap_by_loop(sims, ql, gl, k)


@pytest.mark.parametrize("k", [None, 10])
def test_average_precision_matches_brute_force(k: int | None) -> None:
    rng = np.random.default_rng(3)
    q = rng.standard_normal((30, 6))
    g = rng.standard_normal((80, 6))
    ql, gl = rng.integers(0, 4, 30), rng.integers(0, 4, 80)
    ap = average_precision_per_query(q, g, ql, gl, k=k, block_elems=100)
    np.testing.assert_allclose(ap, _brute_force_ap(q, g, ql, gl, k), rtol=1e-10, atol=1e-12)


def test_map_both_ways() -> None:
    rng = np.random.default_rng(4)
    img, txt = rng.standard_normal((25, 5)), rng.standard_normal((25, 5))
    labels = rng.integers(0, 3, 25)
    out = map_both_ways(img, txt, labels)
    assert out["i2t_map"] == pytest.approx(mean_average_precision(img, txt, labels, labels))
    assert out["t2i_map"] == pytest.approx(mean_average_precision(txt, img, labels, labels))
    assert out["avg_map"] == pytest.approx((out["i2t_map"] + out["t2i_map"]) / 2)
    # Identical views with one cluster per class rank all same-class items first: mAP = 1.
    centres = np.eye(3)[labels] * 10 + rng.standard_normal((25, 3)) * 0.01
    assert map_both_ways(centres, centres, labels)["avg_map"] == pytest.approx(1.0)


def test_map_errors() -> None:
    q = np.ones((2, 3))
    with pytest.raises(ValueError, match="dim"):
        mean_average_precision(q, np.ones((4, 2)), [0, 1], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="gallery_labels"):
        mean_average_precision(q, np.ones((4, 3)), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="k must be"):
        mean_average_precision(q, np.ones((4, 3)), [0, 1], [0, 1, 0, 1], k=0)


def test_modality_gap_by_hand():
    from raycmr.evaluate.metrics import modality_gap

    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    assert modality_gap(np.array([e1, e1]), np.array([e2, e2])) == pytest.approx(np.sqrt(2))
    assert modality_gap(np.array([e1, e2]), np.array([e2, e1])) == pytest.approx(0.0)
    # centroids (0.5, 0.5) and (1, 0): distance sqrt(0.25 + 0.25)
    assert modality_gap(np.array([e1, e2]), np.array([e1, e1])) == pytest.approx(np.sqrt(0.5))
