"""In-batch softmax over pair scores: each query's own item against every other item of the batch.

For a ``[B, B]`` score matrix ``S`` (query ``i`` against item ``j``, the positive on the
diagonal)::

    L = -1/B sum_i log( exp(S_ii) / sum_{j not in G(i) \\ {i}} exp(S_ij) )

where ``G(i)`` are the rows sharing query ``i``'s group (captions of one image): they are not
negatives, so their scores are left out of the denominator. Without groups every other item is
a negative (plain cross-entropy over the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax_loss(scores: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """The loss above of ``scores`` ``[B, B]``; ``groups`` ``[B]`` (or None)."""
    b = scores.shape[0]
    if groups is not None:
        same = (groups[:, None] == groups[None, :]) & ~torch.eye(b, dtype=torch.bool,
                                                                 device=scores.device)
        scores = scores.masked_fill(same, float("-inf"))
    return F.cross_entropy(scores, torch.arange(b, device=scores.device))
