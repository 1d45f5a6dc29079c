"""The feature teacher: a cross-attention scorer of (text vector, image vector) pairs, the
frozen teacher that ``loss.distill.feature_teacher`` distils into a dual encoder on feature shards.

After the slow model of Miech et al., "Thinking Fast and Slow: Efficient Text-to-Visual Retrieval
with Transformers" (CVPR 2021): the query's tokens attend to the image's tokens, so it scores
each (query, image) pair jointly, which a dot product of two independent embeddings cannot:

    q_1..q_L  = query tokens      (a text feature vector split into ``query_tokens`` tokens by one
                                   linear map, or token ids -> embeddings)
    m_1..m_T  = image tokens      (the image vector split into ``image_tokens`` tokens by one
                                   linear map)
    h         = DecoderLayer^n(q, memory=m)     self-attention over q, cross-attention q -> m
    s(q, m)   = w . LayerNorm(mean_l h_l)       one relevance score per pair

Plain PyTorch: no Ray in here. :func:`raycmr.teacher.fit.fit_teacher` trains one on in-memory
pairs with an in-batch softmax; ``raycmr teacher`` fits one on a checkpoint's shards. Image
galleries' slow stage is the captioning model of :mod:`raycmr.models.slow`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raycmr.config import ConfigError

WEIGHTS_FILE, CONFIG_FILE = "feature_teacher.pt", "feature_teacher.yaml"
QUERY_KINDS = ("features", "tokens")


@dataclass
class FeatureTeacherConfig:
    """Shape of a :class:`FeatureTeacher`."""

    query: str = "features"  # "features" (a text_feat vector) or "tokens" (token ids + mask)
    text_dim: int = 0  # features: length of the text_feat vector
    vocab_size: int = 30522  # tokens: tokenizer vocabulary size (MiniLM/BERT uncased)
    max_text_len: int = 32  # tokens: longest query (positions)
    query_tokens: int = 4  # features: tokens the text vector is split into
    image_dim: int = 0  # length of the stored per-image vector
    image_tokens: int = 8  # tokens the image vector is split into
    width: int = 64
    heads: int = 4
    layers: int = 1
    dropout: float = 0.0
    # Residual: final score = own score + fast_weight * the dual encoder's dot product of the
    # pair (0 = its own score alone). The head then starts at zero, so an untrained one ranks
    # exactly like the fast stage and training learns a correction.
    fast_weight: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if self.query not in QUERY_KINDS:
            raise ConfigError(f"feature_teacher.query is {self.query!r}; choose features or tokens")
        if self.query == "features" and self.text_dim <= 0:
            raise ConfigError("feature_teacher.query=features needs text_dim (text_feat length)")
        if self.query == "tokens" and (self.vocab_size <= 0 or self.max_text_len <= 0):
            raise ConfigError("feature_teacher.query=tokens needs vocab_size, max_text_len > 0")
        if self.image_dim <= 0:
            raise ConfigError("feature_teacher.image_dim must be the length of the image vectors")
        for name in ("query_tokens", "image_tokens", "width", "heads", "layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"feature_teacher.{name} must be positive, got {getattr(self, name)}")
        if self.fast_weight < 0:
            raise ConfigError(f"feature_teacher.fast_weight must be >= 0, got {self.fast_weight}")
        if self.width % self.heads:
            raise ConfigError(f"feature_teacher.width={self.width} must be a multiple of "
                              f"feature_teacher.heads={self.heads}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureTeacherConfig:
        """Build from a mapping; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown feature_teacher config key(s) {', '.join(unknown)}; "
                f"valid: {', '.join(names)}"
            )
        cfg = cls(**values)
        cfg.validate()
        return cfg


class FeatureTeacher(nn.Module):
    """Scores (query, image vector) pairs; see the module docstring for the architecture."""

    def __init__(self, cfg: FeatureTeacherConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w = cfg.width
        if cfg.query == "features":
            self.query_in = nn.Sequential(nn.LayerNorm(cfg.text_dim),
                                          nn.Linear(cfg.text_dim, cfg.query_tokens * w))
            self.query_pos = nn.Parameter(torch.randn(cfg.query_tokens, w) * 0.02)
        else:
            self.token_emb = nn.Embedding(cfg.vocab_size, w)
            self.query_pos = nn.Parameter(torch.randn(cfg.max_text_len, w) * 0.02)
        self.image_in = nn.Sequential(nn.LayerNorm(cfg.image_dim),
                                      nn.Linear(cfg.image_dim, cfg.image_tokens * w))
        self.image_pos = nn.Parameter(torch.randn(cfg.image_tokens, w) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(w, cfg.heads, 4 * w, cfg.dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)
        if cfg.fast_weight > 0:  # residual: start from the fast stage's ranking
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def query_states(self, query: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [Q, L, w], keep [Q, L] bool)`` for a batch of queries.

        ``query`` holds ``text_feat`` [Q, text_dim] (features) or ``input_ids`` and
        ``attention_mask`` [Q, L] (tokens, L <= max_text_len).
        """
        cfg = self.cfg
        if cfg.query == "features":
            if "text_feat" not in query:
                raise ValueError("this teacher scores text_feat vectors; got no 'text_feat'")
            x = query["text_feat"].float()
            tokens = self.query_in(x).view(x.shape[0], cfg.query_tokens, cfg.width)
            keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            return tokens + self.query_pos, keep
        if "input_ids" not in query:
            raise ValueError("this teacher scores token ids; got no 'input_ids'")
        ids = query["input_ids"][:, : cfg.max_text_len]
        keep = query["attention_mask"][:, : cfg.max_text_len].bool()
        keep[:, 0] = True  # an all-padding row would make attention NaN
        tokens = self.token_emb(ids) + self.query_pos[: ids.shape[1]]
        return tokens, keep

    def image_states(self, image: torch.Tensor) -> torch.Tensor:
        """Image vectors [P, image_dim] -> image tokens [P, image_tokens, w]."""
        cfg = self.cfg
        tokens = self.image_in(image.float()).view(image.shape[0], cfg.image_tokens, cfg.width)
        return tokens + self.image_pos

    def score_pairs(self, query: dict[str, torch.Tensor], image: torch.Tensor,
                    query_index: torch.Tensor) -> torch.Tensor:
        """Scores [P] of pairs ``(query[query_index[p]], image[p])``.

        The query side is computed once per query and gathered, so one query may be paired with
        many candidates at little extra cost.
        """
        tokens, keep = self.query_states(query)
        x = tokens.index_select(0, query_index)
        keep = keep.index_select(0, query_index)
        memory = self.image_states(image)
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=~keep)
        mask = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * mask).sum(1) / mask.sum(1)
        return self.head(self.norm(pooled)).squeeze(-1)

    def forward(self, query: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """Scores [B] of the aligned pairs ``(query[i], image[i])``."""
        index = torch.arange(image.shape[0], device=image.device)
        return self.score_pairs(query, image, index)

    def score_candidates(self, query: dict[str, torch.Tensor],
                         candidates: torch.Tensor) -> torch.Tensor:
        """Scores [Q, C] of every query against its own candidates [Q, C, image_dim]."""
        q, c = candidates.shape[:2]
        index = torch.arange(q, device=candidates.device).repeat_interleave(c)
        return self.score_pairs(query, candidates.reshape(q * c, -1), index).view(q, c)


def select_queries(query: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    """The queries at ``rows`` (an index tensor or array) of every tensor in ``query``."""
    rows = torch.as_tensor(rows)
    return {k: v[rows] for k, v in query.items()}
