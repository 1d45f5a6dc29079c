"""The feature teacher: pair/candidate scoring agree, padding is masked, it learns a
matching task a random model cannot do, and it round-trips through save/load."""

from __future__ import annotations

import math

import pytest
import torch

from raycmr.artifacts import load_feature_teacher, save_feature_teacher
from raycmr.config import ConfigError
from raycmr.models.feature_teacher import FeatureTeacher, FeatureTeacherConfig
from raycmr.teacher.fit import fit_teacher


def synthetic_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_feat [n, 8], image_feat [n, 16])``: the text is a fixed linear view of its image
    plus noise, so the true image of a query is recoverable by a model that learns the map."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 16, generator=g)
    mix = torch.randn(16, 8, generator=torch.Generator().manual_seed(123))
    return image @ mix / 4 + 0.1 * torch.randn(n, 8, generator=g), image


def small_cfg(**kw) -> FeatureTeacherConfig:
    base = {"query": "features", "text_dim": 8, "image_dim": 16, "width": 16, "heads": 2,
            "query_tokens": 2, "image_tokens": 2}
    return FeatureTeacherConfig(**{**base, **kw})


def recall_at_1(model: FeatureTeacher, text: torch.Tensor, image: torch.Tensor) -> float:
    n = image.shape[0]
    with torch.no_grad():
        scores = model.score_candidates({"text_feat": text},
                                        image.unsqueeze(0).expand(n, n, image.shape[1]))
    return float((scores.argmax(1) == torch.arange(n)).float().mean())


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pair_and_candidate_scoring_agree() -> None:
    torch.manual_seed(0)
    model = FeatureTeacher(small_cfg(layers=2)).eval()
    text, image = synthetic_pairs(5, seed=1)
    cands = torch.randn(5, 3, 16)
    with torch.no_grad():
        grid = model.score_candidates({"text_feat": text}, cands)
        one_by_one = torch.stack([
            torch.stack([model({"text_feat": text[q:q + 1]}, cands[q, c:c + 1])[0]
                         for c in range(3)]) for q in range(5)
        ])
        aligned = model({"text_feat": text}, image)
    assert grid.shape == (5, 3)
    torch.testing.assert_close(grid, one_by_one, atol=1e-5, rtol=0)
    # the score depends on the image through cross-attention
    assert (aligned - model({"text_feat": text}, image.flip(0))).abs().max() > 1e-3


def test_token_queries_ignore_padding() -> None:
    torch.manual_seed(0)
    model = FeatureTeacher(small_cfg(query="tokens", vocab_size=50, max_text_len=12))
    model.eval()
    ids = torch.tensor([[1, 7, 9, 2, 0, 0], [1, 4, 2, 0, 0, 0]])
    mask = (ids > 0).long()
    longer_ids = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], 1)
    longer_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], 1)
    image = torch.randn(2, 16)
    with torch.no_grad():
        short = model({"input_ids": ids, "attention_mask": mask}, image)
        longer = model({"input_ids": longer_ids, "attention_mask": longer_mask}, image)
        garbage = model({"input_ids": longer_ids.masked_fill(longer_mask == 0, 33),
                         "attention_mask": longer_mask}, image)
    torch.testing.assert_close(short, longer, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, garbage, atol=1e-5, rtol=0)  # padded ids are not read
    with pytest.raises(ValueError, match="text_feat"):
        FeatureTeacher(small_cfg())({"input_ids": ids}, image)


def test_fit_teacher_learns_the_matching() -> None:
    torch.manual_seed(0)
    model = FeatureTeacher(small_cfg())
    train_text, train_image = synthetic_pairs(256, seed=1)
    test_text, test_image = synthetic_pairs(32, seed=2)  # held-out pairs, 32 candidates each
    before = recall_at_1(model, test_text, test_image)
    losses = fit_teacher(model, {"text_feat": train_text}, train_image, steps=100,
                         batch_size=32, lr=1e-2)
    after = recall_at_1(model, test_text, test_image)
    print(f"teacher R@1 over 32 candidates: {before:.3f} untrained -> {after:.3f} trained "
          f"(loss {losses[0]:.2f} -> {losses[-1]:.2f})")
    assert before <= 0.15  # chance is 1/32
    assert after >= 0.6
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


def test_groups_are_not_negatives() -> None:
    """Two captions of one image: with groups each caption's twin image is left out of its
    softmax, so the first step's loss is the hand-computed one over the other images; without
    groups the twin (an identical image, an identical score) caps p(true image) at 1/2."""
    torch.manual_seed(0)
    model = FeatureTeacher(small_cfg())
    text, image = synthetic_pairs(8, seed=3)
    image = image[torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])]  # two captions per image
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.no_grad():
        scores = model.score_candidates({"text_feat": text}, image.unsqueeze(0).expand(8, 8, 16))
    twin = torch.arange(8) ^ 1  # the other caption of the same image
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[torch.arange(8), twin] = False
    expected = float(-(scores.diagonal() - torch.stack(
        [scores[i][keep[i]].logsumexp(0) for i in range(8)])).mean())
    # lr=0: the one step leaves the weights as they are; the whole batch in any order
    first = fit_teacher(model, {"text_feat": text}, image, groups=groups, steps=1,
                        batch_size=8, lr=0.0)
    assert first[0] == pytest.approx(expected, rel=1e-5)
    ungrouped = fit_teacher(model, {"text_feat": text}, image, steps=1, batch_size=8, lr=0.0)
    assert ungrouped[0] >= math.log(2) - 1e-6 and ungrouped[0] > first[0] + 0.1


def test_save_load_round_trip_and_config_errors(tmp_path) -> None:
    torch.manual_seed(0)
    model = FeatureTeacher(small_cfg()).eval()
    text, image = synthetic_pairs(4, seed=4)
    loaded = load_feature_teacher(save_feature_teacher(model, tmp_path / "rr"))
    with torch.no_grad():
        torch.testing.assert_close(model({"text_feat": text}, image),
                                   loaded({"text_feat": text}, image))
    assert loaded.cfg == model.cfg and not loaded.training
    with pytest.raises(ConfigError, match="no feature teacher at"):
        load_feature_teacher(tmp_path / "missing")
    with pytest.raises(ConfigError, match="unknown feature_teacher config key"):
        FeatureTeacherConfig.from_dict({"widht": 3})
    with pytest.raises(ConfigError, match="multiple of feature_teacher.heads"):
        FeatureTeacher(small_cfg(width=10, heads=4))
    with pytest.raises(ConfigError, match="text_dim"):
        FeatureTeacher(small_cfg(text_dim=0))
