"""Semantic (classification) loss of one domain, as in DCKT's semantic layer.

DCKT (Huang & Peng, CVPR 2018, "Deep Cross-media Knowledge Transfer") keeps the common
representation semantically discriminative with a softmax classifier per domain (the source
domain's classes and the target domain's classes each have their own output layer). For one
domain, with logits ``z_i`` and label ``y_i``::

    L_sem = -1/|L| sum_{i in L} log softmax(z_i)[y_i],     L = { i : y_i != -1 }

Rows labelled ``-1`` (unlabelled or unknown) are ignored. When no row is labelled the loss is 0,
still connected to the graph so that every worker runs the same backward.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_LABEL = -1


def semantic_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the rows of ``logits`` ``[n, C]`` whose ``labels`` ``[n]``
    are not ``-1``; 0 (with a gradient path) if every row is ``-1``."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"semantic_loss needs logits [n, C] and labels [n], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    keep = labels != IGNORE_LABEL
    if not bool(keep.any()):
        return logits.sum() * 0.0
    bad = keep & ((labels < 0) | (labels >= logits.shape[1]))
    if bool(bad.any()):
        raise ValueError(
            f"semantic_loss labels must be -1 (ignored) or lie in [0, {logits.shape[1]}); got "
            f"{labels[bad][:5].tolist()}"
        )
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL)
