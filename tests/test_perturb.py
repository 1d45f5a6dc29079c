"""Caption perturbers (raycmr/data/perturb.py): each swap produces the intended caption and
nothing else; no perturbation equals its source; captions with nothing to perturb get none."""

import re

import numpy as np
import pytest

from raycmr.data.perturb import (
    generic_candidates,
    generic_negatives,
    synthetic_candidates,
    synthetic_negatives,
)
from raycmr.data.synthetic import caption, sample_scene

SOURCE = "a picture of two large red circles on the left and a small blue cross at the top"


def test_synthetic_swaps_are_exactly_the_intended_captions():
    c = synthetic_candidates(SOURCE)
    assert c["swap_colour"] == [
        "a picture of two large blue circles on the left and a small red cross at the top"]
    assert c["swap_shape"] == [
        "a picture of two large red crosses on the left and a small blue circle at the top"]
    assert c["swap_position"] == [
        "a picture of two large red circles at the top and a small blue cross on the left"]


def test_synthetic_replacements_change_one_word():
    c = synthetic_candidates(SOURCE)
    # 2 objects x 6 other colours; 2 objects x 4 other shapes
    assert len(c["replace_colour"]) == 12 and len(c["replace_shape"]) == 8
    src = SOURCE.split()
    for kind in ("replace_colour", "replace_shape"):
        for text in c[kind]:
            words = text.split()
            assert len(words) == len(src)
            assert sum(a != b for a, b in zip(words, src)) == 1
    assert "a picture of two large red squares on the left and a small blue cross at the top" \
        in c["replace_shape"]
    assert "a picture of two large red circles on the left and a small blue diamond at the top" \
        in c["replace_shape"]


def test_no_perturbation_equals_its_source_over_generated_captions():
    for i in range(200):
        rng = np.random.default_rng([5, i])
        text = caption(sample_scene(rng), rng)
        for kind, pool in [*synthetic_candidates(text).items(), *generic_candidates(text).items()]:
            assert text not in pool, (kind, text)
            assert len(set(pool)) == len(pool)
        drawn = synthetic_negatives(text, 4, np.random.default_rng(i))
        assert len(drawn) == min(4, sum(map(len, synthetic_candidates(text).values())))
        assert len(set(drawn)) == len(drawn) and text not in drawn


def test_swaps_need_two_different_objects():
    one = "there is a small green square in the center"
    c = synthetic_candidates(one)
    assert c["swap_colour"] == c["swap_shape"] == c["swap_position"] == []
    same_colour = "a small red circle on the left and a large red square at the top"
    assert synthetic_candidates(same_colour)["swap_colour"] == []
    assert synthetic_negatives("a photo of nothing in particular", 3, np.random.default_rng(0)) \
        == []


def test_generic_swaps_two_words_and_nothing_else():
    c = generic_candidates("A small dog chases a big ball.")
    assert c["swap_adjectives"] == ["A big dog chases a small ball."]
    assert "A small ball chases a big dog." in c["swap_content"]
    src = re.findall(r"[A-Za-z]+", "A small dog chases a big ball.")
    for text in c["swap_content"]:
        words = re.findall(r"[A-Za-z]+", text)
        i, j = [n for n, (a, b) in enumerate(zip(words, src)) if a != b]
        assert (words[i], words[j]) == (src[j], src[i]) and text.endswith(".")
    assert generic_negatives("a dog", 2, np.random.default_rng(0)) == []
    assert generic_negatives("the the the", 2, np.random.default_rng(0)) == []


def test_draws_are_deterministic_by_rng():
    a = synthetic_negatives(SOURCE, 5, np.random.default_rng(3))
    b = synthetic_negatives(SOURCE, 5, np.random.default_rng(3))
    assert a == b and len(a) == 5
    # the first round takes one of each kind: all three binding swaps are among the first five
    assert {*synthetic_candidates(SOURCE)["swap_colour"],
            *synthetic_candidates(SOURCE)["swap_position"]} <= set(a)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_captions_have_no_negatives(text):
    assert synthetic_negatives(text, 2, np.random.default_rng(0)) == []
    assert generic_negatives(text, 2, np.random.default_rng(0)) == []


def test_hard_negative_columns_tokenize_and_mark_missing_ones():
    from raycmr.data.text import load_text_encoder
    from raycmr.data.transforms import hard_negative_columns

    encode = load_text_encoder("minilm")
    texts = [SOURCE, "a photo of nothing in particular", ""]
    rngs = [np.random.default_rng(i) for i in range(3)]
    cols = hard_negative_columns(texts, rngs, "synthetic", 2, encode, 24)
    assert cols["neg_valid"].tolist() == [[True, True], [False, False], [False, False]]
    expected = synthetic_negatives(SOURCE, 2, np.random.default_rng(0))
    ids, mask = encode(expected, 24)
    assert (cols["neg_input_ids"][0] == ids).all() and (cols["neg_attention_mask"][0] == mask).all()
    assert not cols["neg_input_ids"][1:].any() and not cols["neg_attention_mask"][1:].any()


def test_objective_counts_captions_without_hard_negatives():
    import torch

    from raycmr.config import load_config
    from raycmr.configs.tiny import TINY_TOWERS
    from raycmr.data.text import load_text_encoder
    from raycmr.data.transforms import hard_negative_columns
    from raycmr.train.dual_encoder.objective import CrossModalObjective

    cfg = load_config("quickstart", ["data.image_size=32", "model.embed_dim=16", *TINY_TOWERS,
                                     "data.hard_negatives.kind=synthetic",
                                     "data.hard_negatives.k=2"])
    encode = load_text_encoder("minilm")
    texts = [SOURCE, "a photo of nothing in particular", SOURCE, "there is a red circle"]
    ids, mask = encode(texts, 24)
    cols = hard_negative_columns(texts, [np.random.default_rng(i) for i in range(4)],
                                 "synthetic", 2, encode, 24)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": torch.from_numpy(ids),
             "attention_mask": torch.from_numpy(mask), "group": torch.arange(4),
             **{k: torch.from_numpy(v) for k, v in cols.items()}}
    torch.manual_seed(0)
    parts = CrossModalObjective(cfg)(batch)
    assert parts["hard_neg_unchanged"].item() == 0.5  # rows 1 and 3 match no object phrase
    assert parts["hard_neg_per_caption"].item() == 1.0
    assert torch.isfinite(parts["loss"])
