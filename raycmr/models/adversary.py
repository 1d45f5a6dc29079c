"""The modality discriminator of the GRL adversary (its loss: :mod:`raycmr.losses.adversary`).

Adversarial cross-modal learning (ACMR, Wang et al., ACM MM 2017) trains a discriminator to tell
image embeddings from text embeddings while the encoders, through a gradient reversal layer,
learn to make the two modalities indistinguishable.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import torch
from torch import nn


class ModalityDiscriminator(nn.Module):
    """Small MLP ``embed_dim -> hidden_dim -> num_logits`` that predicts the modality.

    ``num_logits=2``: two-way softmax logits (class 0 = image, class 1 = text).
    ``num_logits=1``: a single logit, ``sigmoid(logit) = P(text)``.
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
        self.num_logits = num_logits
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_logits),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_logits]``."""
        return self.net(x)
