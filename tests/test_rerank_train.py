"""Pieces of `raycmr reranker` that need no cluster: the held-out R@1 and the reranker shape."""

from __future__ import annotations

import numpy as np
import torch

from raycmr.config import load_config
from raycmr.rerank_train import block_recall_at_1, reranker_config


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


def test_reranker_config_follows_the_checkpoint_inputs() -> None:
    image = torch.zeros(3, 48)
    feats = reranker_config(load_config("wikipedia"),
                            {"query": {"text_feat": torch.zeros(3, 10)}, "image": image},
                            width=16, heads=2, layers=1)
    assert (feats.query, feats.text_dim, feats.image_dim, feats.width) == ("features", 10, 48, 16)
    cfg = load_config("quickstart")
    tokens = reranker_config(cfg, {"query": {"input_ids": torch.zeros(3, 8, dtype=torch.long)},
                                   "image": image}, width=16, heads=2, layers=2)
    assert (tokens.query, tokens.vocab_size, tokens.max_text_len, tokens.image_dim,
            tokens.layers) == ("tokens", 30522, cfg.data.max_text_len, 48, 2)
