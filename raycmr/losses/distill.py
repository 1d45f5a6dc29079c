"""Slow -> fast distillation: the dual encoder learns the cross-attention reranker's ranking.

Miech et al., "Thinking Fast and Slow" (CVPR 2021) pair a fast dual encoder with a slow
cross-attention model and distil the slow one into the fast one. Here the slow model (a frozen
:class:`~raycmr.models.reranker.CrossAttentionReranker`) scores every (text, image) pair of the
local batch, and each text query's distribution over the batch's images is a soft target for the
fast model's (Hinton et al. 2015's knowledge distillation)::

    q_tj = softmax_j(s_slow(t, j) / T)                 teacher, temperature T
    p_tj = softmax_j(exp(logit_scale) * <v_t, u_j>)     fast: scaled cosine of the embeddings
    L    = (1/B) sum_t KL(q_t || p_t) = (1/B) sum_t sum_j q_tj (log q_tj - log p_tj)

The fast side uses the dual encoder's learnable inverse temperature, so it can match the
teacher's sharpness. Pure function of tensors; no gradient reaches the teacher's scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(fast_logits: torch.Tensor, slow_scores: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(softmax(slow / T) || softmax(fast)); both [B, N], row = query."""
    if fast_logits.shape != slow_scores.shape or fast_logits.dim() != 2:
        raise ValueError(f"fast logits {tuple(fast_logits.shape)} and slow scores "
                         f"{tuple(slow_scores.shape)} must be the same [queries, candidates] shape")
    target = F.softmax(slow_scores.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(fast_logits.float(), dim=-1)
    return F.kl_div(log_p, target, reduction="batchmean")
