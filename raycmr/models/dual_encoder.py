"""Dual encoder: two towers -> projections -> optional weight-shared top layers -> L2 norm.

    u = normalize(shared(W_i f_img(x)))      v = normalize(shared(W_t f_txt(t)))

Both modalities land in one d-dim common space where similarity is the dot product. An optional
linear classifier on the common space (shared by both modalities) serves DSCMR's label-space
loss; ``logit_scale`` is InfoNCE's learnable inverse temperature (log-parametrised, as in CLIP).

Retrieval (evaluation, the FAISS index, serving) ranks with :meth:`DualEncoder.retrieval_embed`:
the common-space vectors, or, with ``retrieval_space: label``, the label-space embeddings of
:func:`label_space_embedding`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raycmr.config import ModelConfig
from raycmr.models.towers import build_tower


def _shared_layers(dim: int, count: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.ReLU(), nn.Linear(dim, dim)]
    return nn.Sequential(*layers) if layers else nn.Identity()


def label_space_embedding(logits: torch.Tensor, modality: str, temperature: float = 1.0):
    """Unit vectors whose cross-modal dot product is the probability that two items share a class.

    With posteriors ``p = softmax(logits / T)`` and ``r = sqrt(1 - |p|^2)`` (``|p| <= 1`` for a
    probability vector)::

        e_image = [p, r, 0]        e_text = [p, 0, r]
        <e_image(i), e_text(t)> = sum_c p(c | i) p(c | t) = P(class(i) = class(t))

    for independent posteriors. The two padding coordinates make every vector unit-length, so
    cosine ranking, inner-product FAISS indexes and the metrics rank by that probability
    unchanged (the inner-product-to-cosine reduction of Bachrach et al., RecSys 2014). Ranking by
    cosine of the raw posteriors instead would favour uncertain gallery items.
    """
    work = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least, fp64 kept
    p = torch.softmax(logits.to(work) / temperature, dim=-1)
    r = (1.0 - (p * p).sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
    zero = torch.zeros_like(r)
    pad = [r, zero] if modality == "image" else [zero, r]
    return torch.cat([p, *pad], dim=-1).to(logits.dtype)


def retrieval_dim(cfg: ModelConfig) -> int:
    """Length of the vectors :meth:`DualEncoder.retrieval_embed` returns."""
    return cfg.num_classes + 2 if cfg.retrieval_space == "label" else cfg.embed_dim


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, temperature: float = 0.07):
        super().__init__()
        self.image_tower = build_tower(cfg.image, "image")
        self.text_tower = build_tower(cfg.text, "text")
        self.image_proj = nn.Linear(self.image_tower.out_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(self.text_tower.out_dim, cfg.embed_dim)
        self.shared = _shared_layers(cfg.embed_dim, cfg.shared_layers)
        self.classifier = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else None
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))
        self.features = cfg.image.kind == "mlp"
        self.retrieval_space = cfg.retrieval_space
        self.label_temperature = cfg.label_temperature

    def encode_image(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["image_feat"] if self.features else batch["pixel_values"]
        return F.normalize(self.shared(self.image_proj(self.image_tower(x))), dim=-1)

    def encode_text(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "text_feat" in batch:
            feats = self.text_tower(batch["text_feat"])
        else:
            feats = self.text_tower(batch["input_ids"], batch["attention_mask"])
        return F.normalize(self.shared(self.text_proj(feats)), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_text(batch)

    def to_retrieval(self, emb: torch.Tensor, modality: str) -> torch.Tensor:
        """Common-space embeddings of ``modality`` ("image"/"text") -> retrieval vectors."""
        if self.retrieval_space == "common":
            return emb
        return label_space_embedding(self.classifier(emb), modality, self.label_temperature)

    def retrieval_embed_image(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image vectors that retrieval ranks by dot product (see ``retrieval_space``)."""
        return self.to_retrieval(self.encode_image(batch), "image")

    def retrieval_embed_text(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The text vectors that retrieval ranks by dot product (see ``retrieval_space``)."""
        return self.to_retrieval(self.encode_text(batch), "text")

    def retrieval_embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.retrieval_embed_image(batch), self.retrieval_embed_text(batch)
