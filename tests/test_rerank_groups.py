"""Minimal-pair group accuracy of fast, fast+slow and slow-only (raycmr/evaluate/slow.py)
against a hand-computed case: tiny score matrices whose outcomes are worked out by hand."""

import numpy as np
import pytest
import torch

from raycmr.evaluate.slow import RerankSplit, group_accuracies, group_members

# images 0-2: one colour group, 3-4: one shape group, 5: a group of one (skipped); query q's
# own image is image q
PAIR_GROUP = np.array([7, 7, 7, 9, 9, 11])
PAIR_SWAP = np.array(["colour"] * 3 + ["shape"] * 2 + ["position"], dtype=object)
FAST = torch.tensor([  # fast scores f(x)^T g(y), query x image
    [5., 4, 3, 9, 0, 0],  # own 5 > 4, 3: right; fast top 2 = {3, 0}
    [4., 2, 1, 0, 0, 0],  # own 2 < 4: wrong; top 2 = {0, 1}
    [0., 1, 3, 0, 0, 0],  # own 3: right; top 2 = {2, 1}
    [0., 0, 0, 1, 1, 0],  # own 1 ties image 4: wrong; top 2 = {3, 4}
    [0., 0, 0, 2, 1, 0],  # own 1 < 2: wrong; top 2 = {3, 4}
    [0., 0, 0, 0, 0, 1],
])
SLOW = torch.tensor([  # slow scores h(x, y)
    [1., 2, 0, 0, 0, 0],  # own 1 < 2: wrong
    [0., 5, 1, 0, 0, 0],  # right
    [0., 0, 4, 0, 0, 0],  # right
    [0., 0, 0, 3, 2, 0],  # right
    [0., 0, 0, 3, 3, 0],  # own ties image 3: wrong
    [0., 0, 0, 0, 0, 1],
])


class TableSlow:
    """A slow model whose h is the table SLOW: phi row i holds i, caption q holds q."""

    def score_candidates(self, memory, input_ids, attention_mask):
        return SLOW[input_ids[:, :1], memory[..., 0, 0].long()]


def _split() -> RerankSplit:
    n = len(PAIR_GROUP)
    return RerankSplit(phi=torch.arange(n, dtype=torch.float32).view(n, 1, 1),
                       input_ids=torch.arange(n).view(n, 1), attention_mask=torch.ones(n, 1),
                       target=np.arange(n), fast_img=torch.eye(n), fast_txt=FAST,
                       pair_group=PAIR_GROUP, pair_swap=PAIR_SWAP)


def test_group_members_lists_each_images_group():
    assert group_members(PAIR_GROUP).tolist() == [
        [0, 1, 2], [0, 1, 2], [0, 1, 2], [3, 4, -1], [3, 4, -1], [5, -1, -1]]


def test_group_accuracy_of_fast_fast_slow_and_slow_only_against_hand_values():
    acc = group_accuracies(TableSlow(), _split(), ks=[2, 6], beta=0.0, with_fast=True,
                           chunk=4)  # 4: the queries come in two chunks
    # per query (0..4) right/wrong, worked out from the tables above:
    # fast            T F T F F
    # slow-only       F T T T F
    # fast+slow K=2   T T T T F  (q0: own image in the top 2, its group mates outside it)
    # fast+slow K=6   = slow-only (every image re-ranked, beta 0)
    expected = {("fast", ""): (2, 2, 0), ("slow-only", 6): (3, 2, 1),
                ("fast+slow", 2): (4, 3, 1), ("fast+slow", 6): (3, 2, 1)}
    for key, (right, colour, shape) in expected.items():
        out = acc[key]
        assert out["group_captions"] == 5, key
        assert out["group_acc"] == pytest.approx(100 * right / 5), key
        assert out["group_acc_colour"] == pytest.approx(100 * colour / 3), key
        assert out["group_acc_shape"] == pytest.approx(100 * shape / 2), key
        assert out["group_chance"] == pytest.approx(100 * (3 / 3 + 2 / 2) / 5), key
        assert out["group_chance_shape"] == pytest.approx(50.0), key
        assert "group_acc_position" not in out, key


def test_fast_slow_group_accuracy_adds_beta_times_fast():
    # K = 6, beta = 1: h + f per query: q0 [6, 6, 3] tie -> wrong; q1 [4, 7, 2] right;
    # q2 [0, 1, 7] right; q3 [4, 3] right; q4 [5, 4] wrong
    acc = group_accuracies(TableSlow(), _split(), ks=[6], beta=1.0, with_fast=True)
    assert acc[("fast+slow", 6)]["group_acc"] == pytest.approx(100 * 3 / 5)
    assert acc[("fast+slow", 6)]["group_acc_colour"] == pytest.approx(100 * 2 / 3)
