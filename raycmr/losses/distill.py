"""Slow -> fast distillation: the dual encoder learns a teacher's ranking.

Miech et al., "Thinking Fast and Slow" (CVPR 2021) pair a fast dual encoder with a slow
cross-attention model and distil the slow one into the fast one. On feature shards the teacher
(a frozen :class:`~raycmr.models.feature_teacher.FeatureTeacher`) scores every (text, image) pair
of the local batch, and each text query's distribution over the batch's images is a soft target for the
fast model's (Hinton et al. 2015's knowledge distillation)::

    q_tj = softmax_j(s_slow(t, j) / T)                 teacher, temperature T
    p_tj = softmax_j(exp(logit_scale) * <v_t, u_j>)     fast: scaled cosine of the embeddings
    L    = (1/B) sum_t KL(q_t || p_t) = (1/B) sum_t sum_j q_tj (log q_tj - log p_tj)

The fast side uses the dual encoder's learnable inverse temperature, so it can match the
teacher's sharpness. Pure function of tensors; no gradient reaches the teacher's scores.

With the captioning slow model (:class:`~raycmr.models.slow.SlowModel`, section 2.2 of the
paper) scoring all B^2 pairs is too dear, so each caption's distribution is restricted to
``m + 1`` candidates: its own image (column 0) and the ``m`` in-batch images the fast model
currently scores highest for it (:func:`hardest_candidates`); the teacher scores only those
``B * (m + 1)`` pairs and the fast logits are gathered at the same candidates
(:func:`restricted_distillation_loss`)::

    C_t  = {pos(t)} + top_m {j != pos(t), same group excluded: fast(t, j)}
    L    = (1/B) sum_t KL(softmax_{j in C_t}(s_slow(t, j) / T) || softmax_{j in C_t}(fast(t, j)))
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


def hardest_candidates(fast_logits: torch.Tensor, positive: torch.Tensor, m: int,
                       same_group: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's candidate columns: its positive first, then its ``m`` highest-scoring other
    columns of ``fast_logits`` [B, N] (no gradient is taken through the choice).

    ``positive`` [B]: the positive column of each row; ``same_group`` [B, N] (optional): True
    where a column shows the query's own content (another caption's copy of its image), never a
    negative. Returns ``(candidates [B, m+1] long, valid [B, m+1] bool)``; a row with fewer than
    ``m`` admissible negatives gets invalid fillers."""
    b, n = fast_logits.shape
    if not 1 <= m < n:
        raise ValueError(f"m = {m} hard negatives need 1 <= m < {n} columns")
    scores = fast_logits.detach().float().clone()
    blocked = torch.zeros_like(scores, dtype=torch.bool)
    blocked[torch.arange(b, device=scores.device), positive] = True
    if same_group is not None:
        blocked |= same_group.bool()
    scores[blocked] = -torch.inf
    top = scores.topk(m, dim=1)
    candidates = torch.cat([positive[:, None].long(), top.indices], dim=1)
    valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=scores.device),
                       torch.isfinite(top.values)], dim=1)
    return candidates, valid


def restricted_distillation_loss(fast_logits: torch.Tensor, slow_scores: torch.Tensor,
                                 candidates: torch.Tensor, temperature: float = 1.0,
                                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over queries of KL(softmax(slow / T) || softmax(fast)) over each query's candidates.

    ``fast_logits`` [B, N]: the fast model's logits of every column (with grad);
    ``slow_scores`` [B, C]: the teacher's scores of ``candidates`` [B, C] (column indices into
    ``fast_logits``); ``valid`` [B, C]: False for fillers, which take part on neither side."""
    if slow_scores.shape != candidates.shape or fast_logits.dim() != 2 \
            or candidates.shape[0] != fast_logits.shape[0]:
        raise ValueError(f"fast logits {tuple(fast_logits.shape)}, slow scores "
                         f"{tuple(slow_scores.shape)} and candidates {tuple(candidates.shape)} "
                         "must be [B, N], [B, C] and [B, C]")
    fast = fast_logits.float().gather(1, candidates)
    slow = slow_scores.detach().float() / temperature
    if valid is not None:
        fast = fast.masked_fill(~valid, -torch.inf)
        slow = slow.masked_fill(~valid, -torch.inf)
    log_q = F.log_softmax(slow, dim=-1)
    log_p = F.log_softmax(fast, dim=-1)
    q = log_q.exp()
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum(1).mean()
