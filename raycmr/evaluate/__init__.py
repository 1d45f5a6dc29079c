"""Evaluation: R@K / median rank / mAP (``metrics``) and FAISS index build/search/save (``index``).

``metrics`` is pure numpy; ``index`` imports faiss and is imported on its own
(``from raycmr.evaluate.index import build_index``).
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
