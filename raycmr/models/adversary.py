"""The modality discriminator of the GRL adversary (its losses: :mod:`raycmr.losses.adversary`).

Adversarial cross-modal learning (ACMR, Wang et al., ACM MM 2017) trains a discriminator to tell
image embeddings from text embeddings while the encoders learn to make the two modalities
indistinguishable.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ModalityDiscriminator(nn.Module):
    """Small MLP ``embed_dim -> hidden_dim -> num_logits`` that predicts the modality.

    ``num_logits=2``: two-way softmax logits (class 0 = image, class 1 = text).
    ``num_logits=1``: a single logit, ``sigmoid(logit) = P(text)``.

    ``forward(x, frozen=True)`` computes the same logits with the weights detached: gradient
    reaches ``x`` (the encoders) but not the discriminator, the encoders' half of the two-player
    update. The weights are this module's own parameters (no submodules), so that DeepSpeed
    ZeRO-3, which gathers a module's own parameters before its forward, gathers them for either.
    """

    def __init__(
        self, embed_dim: int, hidden_dim: int = 128, num_logits: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_logits not in (1, 2):
            raise ValueError(f"ModalityDiscriminator num_logits must be 1 or 2, got {num_logits}")
        if embed_dim <= 0 or hidden_dim <= 0:
            raise ValueError(
                f"ModalityDiscriminator needs positive sizes, got embed_dim={embed_dim}, "
                f"hidden_dim={hidden_dim}"
            )
        self.num_logits, self.dropout = num_logits, dropout
        hidden, out = nn.Linear(embed_dim, hidden_dim), nn.Linear(hidden_dim, num_logits)
        self.hidden_weight, self.hidden_bias = hidden.weight, hidden.bias
        self.out_weight, self.out_bias = out.weight, out.bias

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Logits ``[N, num_logits]``; ``frozen``: no gradient to the weights."""
        w1, b1, w2, b2 = (self.hidden_weight, self.hidden_bias, self.out_weight, self.out_bias)
        if frozen:
            w1, b1, w2, b2 = w1.detach(), b1.detach(), w2.detach(), b2.detach()
        h = F.dropout(F.relu(F.linear(x, w1, b1)), self.dropout, self.training)
        return F.linear(h, w2, b2)
