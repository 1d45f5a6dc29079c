"""The slow model's captioning loss (Miech et al., "Thinking Fast and Slow", CVPR 2021, eq. 3).

With ``h(x, y) = log p_fwd(y | x) + log p_bwd(y | x)`` the caption log-likelihood the slow model
scores for image ``x`` and caption ``y`` (:class:`raycmr.models.slow.SlowModel`), over the
positive pairs of a batch (no negatives)::

    L_CA = -1/B sum_i h(x_i, y_i)
"""

from __future__ import annotations

import torch


def captioning_loss(scores: torch.Tensor) -> torch.Tensor:
    """``L_CA`` of the positive pairs' scores ``h(x_i, y_i)`` ``[B]``."""
    return -scores.mean()
