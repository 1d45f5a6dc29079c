"""The slow stage of retrieval: a bidirectional captioning model that cross-attends to the image.

After Miech et al., "Thinking Fast and Slow: Efficient Text-to-Visual Retrieval with
Transformers" (CVPR 2021), section 3.2. The image becomes a grid of spatial tokens
``phi(x) = [m_1 .. m_P]``; two transformer decoders read the caption ``y = (y_1 .. y_L)`` with
causal self-attention and cross-attention to ``phi(x)``, one left to right and one right to left,
and the relevance of a pair is the caption's log-likelihood under both::

    h(x, y) = sum_l log p(y_l | y_<l, phi(x)) + sum_l log p(y_l | y_>l, phi(x))

(divided by the number of predicted tokens per direction with ``length_norm``). Training
maximises it on positive pairs only, ``L_CA = -mean_i h(x_i, y_i)``; re-ranking sorts a query's
candidates by ``h``.

Tokens: a MiniLM-tokenised caption is ``[CLS] w_1 .. w_n [SEP] [PAD]..``. The forward decoder
reads ``[CLS] w_1 .. w_n`` and predicts ``w_1 .. w_n [SEP]``; the backward decoder reads the
reversed caption ``[SEP] w_n .. w_1`` and predicts ``w_n .. w_1 [CLS]``. The decoders predict
over a shortlist of the tokenizer's vocabulary (the tokens seen in the training captions, kept
in the ``vocab`` buffer; any other token becomes ``[UNK]``): scoring a query against hundreds of
images is dominated by the output softmax, which over all 30,522 MiniLM tokens costs 15x the rest
of the decoder.

Vision side (``vision``):
- ``fpn``: the paper's design, a small CNN (four stride-2 stages, 64 -> 4 px for 64 px images)
  whose last feature map is upsampled and added to a 1x1 projection of the finer map before it
  (feature-pyramid style), then smoothed: ``(image_size / 8)^2`` tokens of width ``width``;
- ``patch``: a conv stem (three stride-2 convolutions) giving the same grid of patch tokens,
  followed by ``vision_layers`` transformer encoder layers.

Scoring a gallery (:meth:`SlowModel.gallery` once, then :meth:`SlowModel.score_gallery` per
query): what depends on the image alone is computed once per image, as an index stores it -
``phi(x)`` and every decoder layer's cross-attention keys and values of it - and what depends on
the caption alone once per query (token embeddings and the first layer's causal self-attention),
so a query against K candidates pays only for the K pairs' remaining decoder work. It computes
the same ``h`` as :meth:`SlowModel.score` (eval mode).

Plain PyTorch: no Ray in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycmr.config import ConfigError, SlowConfig

UNK_ID, CLS_ID, SEP_ID, PAD_ID = 100, 101, 102, 0  # BERT / MiniLM uncased special tokens
PHI_STORE_DTYPE = torch.float16  # phi(x) as an index stores it (raycmr/index/phi_store.py)


def stored_phi(phi: torch.Tensor) -> torch.Tensor:
    """phi(x) rounded as the index stores it (float16), back in ``phi``'s dtype: what the
    served slow stage reads, so offline re-ranking scores the same tokens."""
    return phi.to(PHI_STORE_DTYPE).to(phi.dtype)


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class FPNVision(nn.Module):
    """CNN -> last map (1/16) upsampled x2 + 1x1 lateral of the 1/8 map -> 3x3 smoothing."""

    def __init__(self, width: int, channels: tuple[int, int, int, int] = (32, 64, 128, 256)):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.stem = nn.Sequential(_conv(3, c1, 2), _conv(c1, c1, 1))
        self.stage2 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2, 1))
        self.stage3 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3, 1))
        self.stage4 = nn.Sequential(_conv(c3, c4, 2), _conv(c4, c4, 1))
        self.top = nn.Conv2d(c4, width, 1)
        self.lateral = nn.Conv2d(c3, width, 1)
        self.smooth = nn.Conv2d(width, width, 3, 1, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        c3 = self.stage3(self.stage2(self.stem(pixels)))
        c4 = self.stage4(c3)
        fused = self.lateral(c3) + F.interpolate(self.top(c4), size=c3.shape[-2:], mode="nearest")
        return self.smooth(fused)


class PatchVision(nn.Module):
    """Conv stem (three stride-2 convolutions) -> patch tokens -> transformer encoder layers."""

    def __init__(self, width: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width // 4, 2), _conv(width // 4, width // 2, 2),
                                  nn.Conv2d(width // 2, width, 3, 2, 1))
        self.layers = layers
        if layers:
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stem(pixels)


class SpatialTokens(nn.Module):
    """phi(x): pixels ``[B, 3, S, S]`` -> spatial tokens ``[B, (S/8)^2, width]``."""

    def __init__(self, cfg: SlowConfig, image_size: int):
        super().__init__()
        if image_size % 16:
            raise ConfigError(f"the slow model needs data.image_size divisible by 16, got "
                              f"{image_size}")
        self.kind = cfg.vision
        if cfg.vision == "fpn":
            self.net: nn.Module = FPNVision(cfg.width)
        elif cfg.vision == "patch":
            self.net = PatchVision(cfg.width, cfg.vision_layers, cfg.heads, cfg.dropout)
        else:
            raise ConfigError(f"slow.vision is {cfg.vision!r}; choose fpn or patch")
        side = image_size // 8
        self.num_tokens = side * side
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, cfg.width) * 0.02)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = self.net(pixels)  # [B, width, S/8, S/8]
        tokens = grid.flatten(2).transpose(1, 2) + self.pos
        if isinstance(self.net, PatchVision) and self.net.layers:
            tokens = self.net.encoder(tokens)
        return self.norm(tokens)


class CaptionDecoder(nn.Module):
    """Token embeddings + positions -> causal decoder layers with cross-attention -> logits."""

    def __init__(self, cfg: SlowConfig, vocab_size: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, max_len, cfg.width) * 0.02)
        layer = nn.TransformerDecoderLayer(cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, cfg.decoder_layers)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab_size)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor, memory: torch.Tensor):
        """``tokens`` [N, T] (compact ids), ``pad`` [N, T] True at padding, ``memory`` [N, P, d]
        -> logits [N, T, V]; position t sees tokens 0..t and every memory token."""
        t = tokens.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        x = self.embed(tokens) + self.pos[:, :t]
        x = self.layers(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad,
                        tgt_is_causal=True)
        return self.head(self.norm(x))


def reverse_captions(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first ``lengths[i]`` tokens reversed, padding left in place."""
    t = ids.shape[1]
    pos = torch.arange(t, device=ids.device).expand_as(ids)
    src = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)
    return ids.gather(1, src)


class SlowModel(nn.Module):
    """phi(x) + forward (and optionally backward) caption decoders; see the module docstring.

    ``vocab`` (a buffer, saved with the weights) lists the tokenizer ids the decoders predict
    over; :func:`caption_vocab` builds it from training captions."""

    def __init__(self, cfg: SlowConfig, vocab: torch.Tensor, image_size: int, max_text_len: int):
        super().__init__()
        vocab = torch.as_tensor(vocab, dtype=torch.long).unique()
        for special in (PAD_ID, UNK_ID, CLS_ID, SEP_ID):
            if not (vocab == special).any():
                vocab = torch.cat([vocab, torch.tensor([special])]).unique()
        self.cfg = cfg
        self.register_buffer("vocab", vocab)
        lookup = torch.full((int(vocab.max()) + 1,), int((vocab == UNK_ID).nonzero()))
        lookup[vocab] = torch.arange(len(vocab))
        self.register_buffer("lookup", lookup)
        self.vision = SpatialTokens(cfg, image_size)
        self.forward_decoder = CaptionDecoder(cfg, len(vocab), max_text_len)
        self.backward_decoder = CaptionDecoder(cfg, len(vocab), max_text_len) \
            if cfg.bidirectional else None

    def compact(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> indices into ``vocab`` (unknown tokens -> [UNK])."""
        unk = self.lookup[UNK_ID]
        inside = ids < self.lookup.shape[0]
        return torch.where(inside, self.lookup[ids.clamp(max=self.lookup.shape[0] - 1)], unk)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """phi(x): ``[B, P, width]`` spatial tokens."""
        return self.vision(pixels)

    def direction_logprobs(self, decoder: CaptionDecoder, ids: torch.Tensor, mask: torch.Tensor,
                           memory: torch.Tensor) -> torch.Tensor:
        """``[N, T-1]`` log p(ids[:, l+1] | ids[:, :l+1], memory), zero where ``l+1`` is padding."""
        inputs, targets, valid = ids[:, :-1], ids[:, 1:], mask[:, 1:].bool()
        logits = decoder(inputs, ~mask[:, :-1].bool(), memory)
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked * valid

    def token_logprobs(self, memory: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per-token log-probabilities of each direction (forward first), ``[N, T-1]`` each, for
        paired rows of ``memory`` [N, P, d] and captions [N, T]; the caption is trimmed to the
        batch's longest."""
        lengths = attention_mask.sum(1)
        t = max(int(lengths.max()), 2)
        ids, mask = self.compact(input_ids[:, :t]), attention_mask[:, :t]
        out = [self.direction_logprobs(self.forward_decoder, ids, mask, memory)]
        if self.backward_decoder is not None:
            rev = reverse_captions(ids, lengths)
            out.append(self.direction_logprobs(self.backward_decoder, rev, mask, memory))
        return out

    def score(self, memory: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
        """h(x, y) of paired rows: ``[N]``."""
        total = memory.new_zeros(memory.shape[0], dtype=torch.float32)
        predicted = (attention_mask.sum(1) - 1).clamp(min=1).float()
        for logp in self.token_logprobs(memory, input_ids, attention_mask):
            s = logp.sum(1)
            total = total + (s / predicted if self.cfg.length_norm else s)
        return total

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """h(x_i, y_i) of each positive pair of the batch: ``[B]``."""
        return self.score(self.encode_image(batch["pixel_values"]), batch["input_ids"],
                          batch["attention_mask"])

    @torch.no_grad()
    def score_candidates(self, memory: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """h of every query caption against its candidates: ``memory`` [Q, K, P, d] (or
        [K, P, d], the same candidates for every query), captions [Q, T] -> ``[Q, K]``; at
        most ``chunk`` pairs go through the decoders at once."""
        q = input_ids.shape[0]
        if memory.dim() == 3:
            memory = memory.unsqueeze(0).expand(q, -1, -1, -1)
        k = memory.shape[1]
        flat_mem = memory.reshape(q * k, *memory.shape[2:])
        ids = input_ids.repeat_interleave(k, 0)
        mask = attention_mask.repeat_interleave(k, 0)
        out = [self.score(flat_mem[s:s + chunk], ids[s:s + chunk], mask[s:s + chunk])
               for s in range(0, q * k, chunk)]
        return torch.cat(out).view(q, k)

    def _decoders(self) -> list[CaptionDecoder]:
        return [self.forward_decoder] + ([self.backward_decoder]
                                         if self.backward_decoder is not None else [])

    @torch.no_grad()
    def gallery(self, phi: torch.Tensor) -> SlowGallery:
        """Index time: ``phi`` [N, P, w] and every decoder layer's cross-attention keys and
        values of it, for :meth:`score_gallery`."""
        return SlowGallery(phi, [[_cross_kv(layer, phi) for layer in dec.layers.layers]
                                 for dec in self._decoders()])

    @torch.no_grad()
    def score_gallery(self, gallery: SlowGallery, candidates: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      chunk: int = 2048) -> torch.Tensor:
        """h of each query caption [Q, T] against its candidate gallery rows ``candidates``
        [Q, K] -> ``[Q, K]``, equal to :meth:`score_candidates` of ``gallery.phi[candidates]``
        (eval mode); at most about ``chunk`` pairs at once."""
        q, k = candidates.shape
        step = max(1, chunk // max(k, 1))
        out = [self._score_gallery(gallery, candidates[s:s + step], input_ids[s:s + step],
                                   attention_mask[s:s + step]) for s in range(0, q, step)]
        return torch.cat(out) if out else candidates.new_zeros((0, k), dtype=torch.float32)

    def _score_gallery(self, gallery: SlowGallery, candidates: torch.Tensor,
                       input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k = candidates.shape
        lengths = attention_mask.sum(1)
        t = max(int(lengths.max()), 2)
        ids, mask = self.compact(input_ids[:, :t]), attention_mask[:, :t]
        flat = candidates.reshape(-1)
        total = torch.zeros(q * k, dtype=torch.float32, device=ids.device)
        predicted = (lengths - 1).clamp(min=1).float().repeat_interleave(k)
        for d, (decoder, kv) in enumerate(zip(self._decoders(), gallery.kv)):
            seq = ids if d == 0 else reverse_captions(ids, lengths)
            inputs, targets = seq[:, :-1], seq[:, 1:]
            valid = mask[:, 1:].bool()
            pad = ~mask[:, :-1].bool()
            n = inputs.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)
            layers = decoder.layers.layers
            # per query: embeddings and the first layer's self-attention (no image in them)
            x = _self_block(layers[0], decoder.embed(inputs) + decoder.pos[:, :n], causal, pad)
            x = x.repeat_interleave(k, 0)  # [Q*K, n, w]
            pad_k = pad.repeat_interleave(k, 0)
            for i, layer in enumerate(layers):
                if i:
                    x = _self_block(layer, x, causal, pad_k)
                ck, cv = kv[i]
                x = _cross_ff_block(layer, x, ck[flat], cv[flat])
            logp = torch.log_softmax(decoder.head(decoder.norm(x)).float(), dim=-1)
            picked = logp.gather(-1, targets.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1)
            s = (picked * valid.repeat_interleave(k, 0)).sum(1)
            total = total + (s / predicted if self.cfg.length_norm else s)
        return total.view(q, k)


class SlowGallery:
    """A gallery laid out for :meth:`SlowModel.score_gallery`: ``phi`` [N, P, w] and, per
    decoder and layer, the cross-attention keys and values ``[N, heads, P, w / heads]``."""

    def __init__(self, phi: torch.Tensor, kv: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        self.phi = phi
        self.kv = kv

    def __len__(self) -> int:
        return int(self.phi.shape[0])

    def select(self, rows: torch.Tensor) -> SlowGallery:
        """The gallery's ``rows`` (e.g. reordered to unique images)."""
        return SlowGallery(self.phi[rows], [[(k[rows], v[rows]) for k, v in layers]
                                            for layers in self.kv])


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, t, d = x.shape
    return x.view(n, t, heads, d // heads).transpose(1, 2)


def _cross_kv(layer: nn.TransformerDecoderLayer, memory: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention keys and values of ``memory`` [N, P, d]: ``[N, heads, P, d/heads]``."""
    mha = layer.multihead_attn
    _, wk, wv = mha.in_proj_weight.chunk(3)
    _, bk, bv = mha.in_proj_bias.chunk(3)
    return (_split_heads(F.linear(memory, wk, bk), mha.num_heads),
            _split_heads(F.linear(memory, wv, bv), mha.num_heads))


def _self_block(layer: nn.TransformerDecoderLayer, x: torch.Tensor, causal: torch.Tensor,
                pad: torch.Tensor) -> torch.Tensor:
    h = layer.norm1(x)
    return x + layer.self_attn(h, h, h, attn_mask=causal, key_padding_mask=pad,
                               need_weights=False, is_causal=True)[0]


def _cross_ff_block(layer: nn.TransformerDecoderLayer, x: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """Cross-attention to cached keys/values ``[M, heads, P, dh]`` and the feed-forward block of
    a pre-norm decoder layer (eval mode: no dropout)."""
    mha = layer.multihead_attn
    wq, _, _ = mha.in_proj_weight.chunk(3)
    bq, _, _ = mha.in_proj_bias.chunk(3)
    q = _split_heads(F.linear(layer.norm2(x), wq, bq), mha.num_heads)
    a = F.scaled_dot_product_attention(q, k, v)  # [M, heads, T, dh]
    x = x + mha.out_proj(a.transpose(1, 2).reshape(x.shape))
    return x + layer._ff_block(layer.norm3(x))


def caption_vocab(input_ids: torch.Tensor | list, attention_mask: torch.Tensor | list,
                  max_size: int = 0) -> torch.Tensor:
    """The tokenizer ids that occur in real (unpadded) caption positions, most frequent first
    when ``max_size`` caps them (0 = all); special tokens are always added by the model."""
    ids = torch.as_tensor(input_ids)[torch.as_tensor(attention_mask).bool()]
    values, counts = ids.unique(return_counts=True)
    if max_size and len(values) > max_size:
        values = values[counts.argsort(descending=True, stable=True)[:max_size]]
    return values.sort().values


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_width(cfg: SlowConfig) -> None:
    if cfg.width % cfg.heads or cfg.width % 4:
        raise ConfigError(f"slow.width ({cfg.width}) must be divisible by slow.heads "
                          f"({cfg.heads}) and by 4")


def build_slow_model(cfg: SlowConfig, vocab: torch.Tensor, image_size: int,
                     max_text_len: int) -> SlowModel:
    _check_width(cfg)
    return SlowModel(cfg, vocab, image_size, max_text_len)
