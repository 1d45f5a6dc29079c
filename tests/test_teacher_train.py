"""Pieces of `raycmr teacher` that need no cluster: the held-out R@1 and the teacher's shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycmr.config import load_config
from raycmr.teacher.train import block_recall_at_1, teacher_config


def test_block_recall_hand_cases() -> None:
    groups = np.arange(10)
    # perfect scores: every query's own image on top
    assert block_recall_at_1(lambda rows: np.eye(len(rows)), groups, 5) == 100.0
    # always the first image of the block: one hit per block of 5 -> 20%
    first = np.zeros((5, 5))
    first[:, 0] = 1.0
    assert block_recall_at_1(lambda rows: first, groups, 5) == 20.0
    # blocks of 4 over 10 pairs: two full blocks are scored, the last 2 pairs are dropped
    seen = []
    block_recall_at_1(lambda rows: seen.append(len(rows)) or np.eye(len(rows)), groups, 4)
    assert seen == [4, 4]
    # captions of one image share its group: any of them on top is a hit
    assert block_recall_at_1(lambda rows: first, np.zeros(10, dtype=int), 5) == 100.0
    # a block larger than the split: one block of everything
    seen.clear()
    block_recall_at_1(lambda rows: seen.append(len(rows)) or np.eye(len(rows)), groups, 100)
    assert seen == [10]


def test_teacher_config_follows_the_checkpoint_inputs() -> None:
    image = torch.zeros(3, 48)
    feats = teacher_config(load_config("wikipedia"),
                           {"query": {"text_feat": torch.zeros(3, 10)}, "image": image},
                           width=16, heads=2, layers=1)
    assert (feats.query, feats.text_dim, feats.image_dim, feats.width) == ("features", 10, 48, 16)
    cfg = load_config("quickstart")
    tokens = teacher_config(cfg, {"query": {"input_ids": torch.zeros(3, 8, dtype=torch.long)},
                                  "image": image}, width=16, heads=2, layers=2)
    assert (tokens.query, tokens.vocab_size, tokens.max_text_len, tokens.image_dim,
            tokens.layers) == ("tokens", 30522, cfg.data.max_text_len, 48, 2)


def test_residual_teacher_starts_at_the_fast_stage_and_improves_on_it() -> None:
    """fast_weight > 0: an untrained model scores exactly fast_weight * <q, g>; training on
    the true features then lifts held-out R@1 above the (noisy) fast stage's."""
    from raycmr.models.feature_teacher import FeatureTeacher, FeatureTeacherConfig
    from raycmr.teacher.fit import fit_teacher

    def pairs(n, seed):
        rng = np.random.default_rng(seed)
        image = rng.standard_normal((n, 16)).astype(np.float32)
        text = image[:, :8] + 0.05 * rng.standard_normal((n, 8)).astype(np.float32)
        # the fast stage sees the pair through heavy noise
        q = image + 1.5 * rng.standard_normal((n, 16)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g = image / np.linalg.norm(image, axis=1, keepdims=True)
        return torch.from_numpy(text), torch.from_numpy(image), q, g

    torch.manual_seed(0)
    model = FeatureTeacher(FeatureTeacherConfig(text_dim=8, image_dim=16, width=16, heads=2,
                                                query_tokens=2, image_tokens=2,
                                                fast_weight=5.0))
    text, image, q, g = pairs(600, seed=1)
    with torch.no_grad():
        slow = model.score_candidates({"text_feat": text[:4]},
                                      image[:4].unsqueeze(0).expand(4, -1, -1))
    assert torch.equal(slow, torch.zeros(4, 4))  # zero head: the combined score is the fast one
    with pytest.raises(ValueError, match="fast="):
        fit_teacher(model, {"text_feat": text}, image, steps=1)
    fit_teacher(model, {"text_feat": text}, image, fast=(torch.from_numpy(q), torch.from_numpy(g)),
                steps=150, batch_size=32, lr=1e-2)
    t_text, t_image, t_q, t_g = pairs(200, seed=2)
    groups = np.arange(200)

    def fast(rows):
        return t_q[rows] @ t_g[rows].T

    @torch.no_grad()
    def combined(rows):
        s = model.score_candidates({"text_feat": t_text[rows]},
                                   t_image[rows].unsqueeze(0).expand(len(rows), -1, -1))
        return s.numpy() + 5.0 * fast(rows)

    fast_r1 = block_recall_at_1(fast, groups, 100)
    reranked_r1 = block_recall_at_1(combined, groups, 100)
    print(f"fast R@1 {fast_r1:.1f}, residual model R@1 {reranked_r1:.1f}")
    assert fast_r1 < 70 and reranked_r1 > fast_r1 + 15
