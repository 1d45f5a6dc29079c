"""From a trained encoder and a stream of batches to the retrieval report of a split."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from raycmr.evaluate.metrics import group_pairs, map_both_ways, retrieval_metrics


@torch.no_grad()
def embed_batches(encoder, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Embed every (image, caption) pair in the retrieval space (``encoder.retrieval_embed``):
    ``img``, ``txt`` [N, d] float32, ``group``, ``label``."""
    parts: dict[str, list[np.ndarray]] = {"img": [], "txt": [], "group": [], "label": []}
    for batch in batches:
        img, txt = encoder.retrieval_embed(batch)
        parts["img"].append(img.float().cpu().numpy())
        parts["txt"].append(txt.float().cpu().numpy())
        parts["group"].append(batch["group"].cpu().numpy())
        parts["label"].append(batch["label"].cpu().numpy())
    if not parts["img"]:
        return {"img": np.zeros((0, 0), np.float32), "txt": np.zeros((0, 0), np.float32),
                "group": np.zeros(0, np.int64), "label": np.zeros(0, np.int64)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_embeddings(emb: dict[str, np.ndarray]) -> dict[str, float]:
    """R@1/5/10, median and mean rank both ways over unique images (captions sharing a group
    are one image: the 5-captions-per-image protocol), plus mAP@all both ways when every pair
    has a label (the Wikipedia protocol: each pair is a query of both modalities)."""
    image_rows, txt_to_img = group_pairs(emb["group"])
    metrics = retrieval_metrics(emb["img"][image_rows], emb["txt"], txt_to_img)
    if emb["label"].size and (emb["label"] >= 0).all():
        metrics.update(map_both_ways(emb["img"], emb["txt"], emb["label"]))
    metrics["num_images"] = float(len(image_rows))
    metrics["num_captions"] = float(len(txt_to_img))
    return {k: float(v) for k, v in metrics.items()}
