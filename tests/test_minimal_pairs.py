"""Minimal pairs: the one-binding swaps of the synthetic generator, their shards, and the group
accuracy of raycmr/evaluate/metrics.py against a hand-computed case."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycmr.data.synthetic import (
    Group,
    Scene,
    generate_minimal_pairs,
    minimal_pair_group,
    swap_binding,
    write_minimal_pairs,
)
from raycmr.evaluate.metrics import group_accuracy

RED_CIRCLE = Group(1, "small", "red", "circle", "left")
BLUE_SQUARE = Group(2, "large", "blue", "square", "right")
RED_CROSS = Group(1, "large", "red", "cross", "top")


@pytest.mark.parametrize("kind,expected", [
    ("colour", (Group(1, "small", "blue", "circle", "left"), Group(2, "large", "red", "square", "right"))),
    ("shape", (Group(1, "small", "red", "square", "left"), Group(2, "large", "blue", "circle", "right"))),
    ("position", (Group(1, "small", "red", "circle", "right"), Group(2, "large", "blue", "square", "left"))),
])
def test_swap_binding_exchanges_one_attribute(kind, expected):
    scene = Scene((RED_CIRCLE, BLUE_SQUARE), "plain")
    assert swap_binding(scene, 0, 1, kind).groups == expected


def test_swaps_that_change_nothing_are_dropped():
    scene = Scene((RED_CIRCLE, BLUE_SQUARE, RED_CROSS), "plain")
    # colour: red-blue (x2) swaps change the scene, red-red does not
    assert len(minimal_pair_group(scene, "colour")) == 3
    assert len(minimal_pair_group(scene, "shape")) == 4
    assert len(minimal_pair_group(scene, "position")) == 4
    assert swap_binding(scene, 0, 2, "colour") is None
    assert len({s.key() for s in minimal_pair_group(scene, "position")}) == 4


def test_minimal_pair_shards_have_group_and_swap(tmp_path):
    groups = list(generate_minimal_pairs(6, seed=1, image_size=32))
    assert [k for _, k, _ in groups] == ["colour", "shape", "position"] * 2
    for _, _, records in groups:
        keys = [r.scene.key() for r in records]
        assert len(records) >= 2 and len(set(keys)) == len(keys)
    summary = write_minimal_pairs(tmp_path, 6, seed=1, image_size=32, progress=False)
    table = pq.read_table(min(tmp_path.glob("*.parquet"))).to_pylist()
    assert summary.rows == len(table) == sum(len(r) for _, _, r in groups)
    assert [(row["group"], row["swap"], row["caption"]) for row in table] == [
        (g, k, rec.captions[0]) for g, k, records in groups for rec in records]


def test_group_accuracy_against_a_hand_computed_case():
    # images (rows) e0..e5 as unit axes / mixtures; captions chosen so that the scores are known
    img = np.eye(6, dtype=np.float32)
    txt = np.array([
        [0.9, 0.1, 0, 0, 0, 0],    # group A (2 images, colour): own 0.9 > 0.1 -> right
        [0.8, 0.2, 0, 0, 0, 0],    # group A: own image 1 scores 0.2 < 0.8 -> wrong
        [0, 0, 0.5, 0.5, 0.1, 0],  # group B (3 images, shape): own 0.5 ties image 3 -> wrong
        [0, 0, 0.1, 0.7, 0.3, 0],  # group B: own 0.7 -> right
        [0, 0, 0.4, 0.1, 0.3, 0],  # group B: own 0.3 < 0.4 -> wrong
        [0, 0, 0, 0, 0, 1.0],      # group C: one image, skipped
    ], dtype=np.float32)
    image_of = np.array([10, 11, 12, 13, 14, 15])
    pair_group = np.array([1, 1, 2, 2, 2, 3])
    kind = np.array(["colour", "colour", "shape", "shape", "shape", "position"], dtype=object)
    out = group_accuracy(img, txt, image_of, pair_group, kind)
    assert out["group_captions"] == 5
    assert out["group_acc"] == pytest.approx(100 * 2 / 5)
    assert out["group_chance"] == pytest.approx(100 * (2 * 1 / 2 + 3 * 1 / 3) / 5)
    assert out["group_acc_colour"] == pytest.approx(50.0)
    assert out["group_acc_shape"] == pytest.approx(100 / 3)
    assert out["group_chance_shape"] == pytest.approx(100 / 3)
    assert "group_acc_position" not in out


def test_group_accuracy_counts_captions_of_one_image_once_as_candidates():
    # two captions of image 0 (rows 0, 1 share image_of), one of image 1: 2 images in the group
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    txt = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    out = group_accuracy(img, txt, np.array([7, 7, 8]), np.array([0, 0, 0]))
    assert out["group_acc"] == pytest.approx(100 * 2 / 3)
    assert out["group_chance"] == pytest.approx(50.0)
