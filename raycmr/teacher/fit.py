"""Fitting the feature teacher on in-memory pairs (in-batch softmax, on the driver)."""

from __future__ import annotations

import torch

from raycmr.losses.in_batch_softmax import in_batch_softmax_loss
from raycmr.models.feature_teacher import FeatureTeacher, select_queries


def fit_teacher(
    model: FeatureTeacher,
    query: dict[str, torch.Tensor],
    image: torch.Tensor,
    *,
    groups: torch.Tensor | None = None,
    fast: tuple[torch.Tensor, torch.Tensor] | None = None,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` on aligned pairs ``(query[i], image[i])``; returns the loss per step.

    Each step samples ``batch_size`` pairs and scores every query against every image of the
    batch; the loss is the cross-entropy of the true image among them (in-batch softmax). Pairs
    sharing a ``groups`` value (captions of one image) are not used as each other's negatives.
    A residual model (``cfg.fast_weight > 0``) needs ``fast = (query_vecs, image_vecs)``, the
    dual encoder's retrieval vectors of the same pairs: its scores are its own score plus
    ``fast_weight * <query_vec, image_vec>``.
    """
    n = image.shape[0]
    if n < 2:
        raise ValueError(f"fit_teacher needs at least 2 pairs, got {n}")
    if (model.cfg.fast_weight > 0) != (fast is not None):
        raise ValueError("a model with fast_weight > 0 trains on the fast stage's vectors: "
                         "pass fast=(query_vecs, image_vecs); without fast_weight, pass none")
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    b = min(batch_size, n)
    for _ in range(steps):
        rows = torch.randperm(n, generator=generator)[:b]
        cands = image[rows].unsqueeze(0).expand(b, b, image.shape[1])
        scores = model.score_candidates(select_queries(query, rows), cands)
        if fast is not None:
            scores = scores + model.cfg.fast_weight * (fast[0][rows] @ fast[1][rows].T)
        loss = in_batch_softmax_loss(scores, None if groups is None else groups[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
