"""Evaluation: R@K / median rank / mAP (``metrics``, pure numpy), the report of a split's
embeddings (``summary``), embedding pairs with a dual encoder in-process or by Ray Data batch
inference (``embedding``), a checkpoint's report (``checkpoint``) and ``raycmr eval`` (``cli``).
FAISS indexes live in :mod:`raycmr.index`.
"""

from raycmr.evaluate.metrics import (
    average_precision_per_query,
    group_pairs,
    map_both_ways,
    mean_average_precision,
    retrieval_metrics,
    retrieval_ranks,
)

__all__ = [
    "average_precision_per_query",
    "group_pairs",
    "map_both_ways",
    "mean_average_precision",
    "retrieval_metrics",
    "retrieval_ranks",
]
