"""DCKT progressive transfer: which target-domain pairs train in the next round.

DCKT (Huang & Peng, CVPR 2018, "Deep Cross-media Knowledge Transfer") transfers from a large
source domain to a small target domain in rounds. Before each round the current model embeds the
target training pairs and scores how well each pair is already retrieved; easy pairs (high AP)
are kept with high probability, hard ones enter gradually as rounds go on.

With ``AP_q`` the retrieval score of target pair ``q`` (:func:`pair_average_precision`) and
``iter`` the 1-based round index, pair ``q`` is selected with probability::

    Pr_q = max(0, min(alpha, 1 - (max_p AP_p - AP_q) / (max_p AP_p * iter)))

The gap to the best pair shrinks by ``1/iter``, so the probabilities drift toward uniform
(``alpha`` for every pair) as rounds go on; ``alpha`` caps them all. If every AP is 0 the gap is
undefined and every pair gets ``alpha``.

Pure numpy; no Ray, no torch needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raycmr.evaluate.metrics import average_precision_per_query


def pair_average_precision(img_emb: Any, txt_emb: Any, labels: Any) -> np.ndarray:
    """Per-pair retrieval score among the target pairs, shape ``[n]`` (float64)::

        AP_q = ( AP(image_q -> all n texts) + AP(text_q -> all n images) ) / 2

    Relevance is "same label" (1-D class ids) or "a shared class" (multi-hot). The ranking (cosine
    similarity, ties in index order) and AP definition (mAP@all) are those of
    :func:`raycmr.evaluate.metrics.average_precision_per_query`. The query's own pair is in the
    gallery, so every query has at least one relevant item.
    """
    i2t = average_precision_per_query(img_emb, txt_emb, labels, labels)
    t2i = average_precision_per_query(txt_emb, img_emb, labels, labels)
    return (i2t + t2i) / 2.0


def selection_probabilities(ap: np.ndarray, round_idx: int, alpha: float) -> np.ndarray:
    """``Pr_q = max(0, min(alpha, 1 - (max(AP) - AP_q) / (max(AP) * round_idx)))``.

    ``round_idx`` counts from 1. Returns float64 ``[n]`` in ``[0, alpha]``.
    """
    ap = np.asarray(ap, dtype=np.float64)
    if ap.ndim != 1:
        raise ValueError(f"ap must be a 1-D array of per-pair scores, got shape {ap.shape}")
    if round_idx < 1:
        raise ValueError(f"round_idx counts from 1, got {round_idx}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"dckt.alpha (selection probability ceiling) must be in (0, 1], got {alpha}")
    if ap.size == 0:
        return ap.copy()
    if np.any(~np.isfinite(ap)) or np.any(ap < 0):
        raise ValueError("ap must hold finite, non-negative scores")
    best = float(ap.max())
    if best == 0.0:
        return np.full(ap.shape, float(alpha))
    raw = 1.0 - (best - ap) / (best * float(round_idx))
    return np.clip(np.minimum(float(alpha), raw), 0.0, None)


def select_pairs(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Independent Bernoulli draw per pair: bool mask, ``True`` with probability ``probs[q]``."""
    probs = np.asarray(probs, dtype=np.float64)
    if np.any(probs < 0) or np.any(probs > 1):
        raise ValueError("selection probabilities must lie in [0, 1]")
    return rng.random(probs.shape) < probs
