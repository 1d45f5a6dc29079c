"""Dual encoder: two towers -> projections -> optional weight-shared top layers -> L2 norm.

    u = normalize(shared(W_i f_img(x)))      v = normalize(shared(W_t f_txt(t)))

Both modalities land in one d-dim common space where similarity is the dot product. An optional
linear classifier on the common space (shared by both modalities) serves DSCMR's label-space
loss; ``logit_scale`` is InfoNCE's learnable inverse temperature (log-parametrised, as in CLIP).
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
