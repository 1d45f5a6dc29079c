"""The retrieval report of a split's embeddings (R@K, ranks, mAP)."""

from __future__ import annotations

import numpy as np

from raycmr.evaluate.metrics import group_pairs, map_both_ways, modality_gap, retrieval_metrics


def evaluate_embeddings(emb: dict[str, np.ndarray]) -> dict[str, float]:
    """R@1/5/10, median and mean rank both ways over unique images (captions sharing a group
    are one image: the 5-captions-per-image protocol), plus mAP@all both ways when every pair
    has a label (the Wikipedia protocol: each pair is a query of both modalities), and the
    modality gap (centroid distance of the image and text embeddings)."""
    image_rows, txt_to_img = group_pairs(emb["group"])
    metrics = retrieval_metrics(emb["img"][image_rows], emb["txt"], txt_to_img)
    if emb["label"].size and (emb["label"] >= 0).all():
        metrics.update(map_both_ways(emb["img"], emb["txt"], emb["label"]))
    metrics["modality_gap"] = modality_gap(emb["img"], emb["txt"])
    metrics["num_images"] = float(len(image_rows))
    metrics["num_captions"] = float(len(txt_to_img))
    return {k: float(v) for k, v in metrics.items()}
