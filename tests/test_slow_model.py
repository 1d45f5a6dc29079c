"""The slow captioning model: h(x, y) against an explicit loop over positions, reversal,
padding and masks for variable-length captions."""

from __future__ import annotations

import pytest
import torch

from raycmr.config import ConfigError, SlowConfig
from raycmr.losses.captioning import captioning_loss
from raycmr.models.slow import (
    CLS_ID,
    PAD_ID,
    SEP_ID,
    UNK_ID,
    build_slow_model,
    caption_vocab,
    reverse_captions,
)

WORDS = [2000 + i for i in range(12)]
MAX_LEN = 10


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SlowConfig(width=32, heads=4, decoder_layers=2, **kwargs)
    model = build_slow_model(cfg, torch.tensor(WORDS), image_size=32, max_text_len=MAX_LEN)
    return model.eval()


def _captions(words: list[list[int]], pad_to: int = MAX_LEN, pad_id: int = PAD_ID):
    ids = torch.full((len(words), pad_to), pad_id)
    mask = torch.zeros(len(words), pad_to, dtype=torch.long)
    for i, w in enumerate(words):
        row = [CLS_ID, *w, SEP_ID]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


CAPTIONS = [[2000, 2003, 2005], [2001], [2002, 2004, 2006, 2008, 2010, 2011], [2007, 2009]]


def _loop_score(model, memory: torch.Tensor, words: list[int]) -> float:
    """sum_l log p(y_l | y_<l) + sum_l log p(y_l | y_>l): one decoder call per position, each
    seeing only its prefix (so causality is not taken from the masks under test)."""
    total = 0.0
    sequences = [[CLS_ID, *words, SEP_ID]]
    if model.backward_decoder is not None:
        sequences.append([SEP_ID, *reversed(words), CLS_ID])
    decoders = [model.forward_decoder, model.backward_decoder]
    for decoder, seq in zip(decoders, sequences):
        ids = model.compact(torch.tensor([seq]))
        for l in range(1, len(seq)):
            prefix = ids[:, :l]
            logits = decoder(prefix, torch.zeros_like(prefix, dtype=torch.bool), memory[None])
            total += float(torch.log_softmax(logits[0, -1], -1)[ids[0, l]])
    return total


@pytest.mark.parametrize("vision", ["fpn", "patch"])
def test_score_equals_loop_over_positions(vision: str) -> None:
    model = _model(vision=vision, vision_layers=1)
    torch.manual_seed(1)
    pixels = torch.randn(len(CAPTIONS), 3, 32, 32)
    with torch.no_grad():
        memory = model.encode_image(pixels)
        ids, mask = _captions(CAPTIONS)
        scores = model.score(memory, ids, mask)
        expected = torch.tensor([_loop_score(model, memory[i], w) for i, w in enumerate(CAPTIONS)])
    assert memory.shape == (4, 16, 32)  # (32 / 8)^2 spatial tokens
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def test_forward_only_and_length_norm() -> None:
    fwd = _model(bidirectional=False)
    assert fwd.backward_decoder is None
    memory = torch.randn(len(CAPTIONS), 16, 32)
    ids, mask = _captions(CAPTIONS)
    with torch.no_grad():
        plain = fwd.score(memory, ids, mask)
        loop = torch.tensor([_loop_score(fwd, memory[i], w) for i, w in enumerate(CAPTIONS)])
        torch.testing.assert_close(plain, loop, atol=1e-4, rtol=1e-5)
        fwd.cfg.length_norm = True
        normed = fwd.score(memory, ids, mask)
    predicted = torch.tensor([len(w) + 1 for w in CAPTIONS], dtype=torch.float32)
    torch.testing.assert_close(normed, plain / predicted)


def test_backward_decoder_reads_reversed_caption() -> None:
    ids, mask = _captions([[5, 6, 7], [8]], pad_to=7)
    rev = reverse_captions(ids, mask.sum(1))
    assert rev.tolist() == [[SEP_ID, 7, 6, 5, CLS_ID, PAD_ID, PAD_ID],
                            [SEP_ID, 8, CLS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    # the backward direction's log-probs are the backward decoder's on the reversed words
    model = _model()
    memory = torch.randn(1, 16, 32)
    words = [2003, 2000, 2007, 2001]
    with torch.no_grad():
        ids, mask = _captions([words])
        _, backward = model.token_logprobs(memory, ids, mask)
        seq = model.compact(torch.tensor([[SEP_ID, *reversed(words), CLS_ID]]))
        logits = model.backward_decoder(seq[:, :-1], torch.zeros_like(seq[:, :-1]).bool(),
                                        memory)
        direct = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[..., 0]
    torch.testing.assert_close(backward[:, :len(words) + 1], direct)


def test_padding_never_leaks() -> None:
    model = _model()
    memory = torch.randn(len(CAPTIONS), 16, 32)
    with torch.no_grad():
        base = model.score(memory, *_captions(CAPTIONS))
        # other token ids under the padding, and longer padding, change nothing
        garbage = model.score(memory, *_captions(CAPTIONS, pad_id=2004))
        longer = model.score(memory, *_captions(CAPTIONS, pad_to=MAX_LEN))
        trimmed = model.score(memory, *_captions(CAPTIONS, pad_to=8))
    torch.testing.assert_close(garbage, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(longer, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(trimmed, base, atol=1e-5, rtol=0)


def test_variable_length_batch_equals_one_by_one() -> None:
    """Self- and cross-attention masks: every caption scored in a mixed-length batch gets the
    score it gets alone, and only its own image moves it."""
    model = _model()
    memory = torch.randn(len(CAPTIONS), 16, 32)
    ids, mask = _captions(CAPTIONS)
    with torch.no_grad():
        batch = model.score(memory, ids, mask)
        alone = torch.cat([model.score(memory[i:i + 1], *_captions([w], pad_to=len(w) + 2))
                           for i, w in enumerate(CAPTIONS)])
        moved = memory.clone()
        moved[2] = torch.randn(16, 32)
        after = model.score(moved, ids, mask)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-5)
    changed = (after - batch).abs() > 1e-3
    assert changed.tolist() == [False, False, True, False]


def test_score_candidates_matches_pairs() -> None:
    model = _model()
    memory = torch.randn(5, 16, 32)
    ids, mask = _captions(CAPTIONS[:3])
    with torch.no_grad():
        grid = model.score_candidates(memory, ids, mask, chunk=4)
        pairs = torch.stack([model.score(memory, ids[q:q + 1].expand(5, -1),
                                         mask[q:q + 1].expand(5, -1)) for q in range(3)])
        per_query = model.score_candidates(memory[None].expand(3, -1, -1, -1), ids, mask)
    torch.testing.assert_close(grid, pairs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_query, grid, atol=1e-4, rtol=1e-5)


def test_vocab_shortlist_and_unknown_tokens() -> None:
    ids, mask = _captions([[7, 7, 9], [9, 11]], pad_to=6)
    assert caption_vocab(ids, mask).tolist() == [7, 9, 11, CLS_ID, SEP_ID]
    # counts: 7, 9, [CLS], [SEP] twice, 11 once; ties keep id order
    assert caption_vocab(ids, mask, max_size=2).tolist() == [7, 9]
    model = _model()
    unk = int(model.compact(torch.tensor(UNK_ID)))
    assert model.vocab[unk] == UNK_ID
    assert model.compact(torch.tensor([2005, 1999, 40000])).tolist() == \
        [int((model.vocab == 2005).nonzero()), unk, unk]


def test_loss_is_minus_mean_score_and_learns() -> None:
    model = _model(bidirectional=False)
    model.train()
    pixels = torch.randn(4, 3, 32, 32)
    ids, mask = _captions(CAPTIONS)
    batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = captioning_loss(model(batch))
    for _ in range(30):
        loss = captioning_loss(model(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()


def test_bad_shapes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="divisible by 16"):
        build_slow_model(SlowConfig(), torch.tensor(WORDS), image_size=40, max_text_len=8)
    with pytest.raises(ConfigError, match="slow.heads"):
        build_slow_model(SlowConfig(width=30, heads=4), torch.tensor(WORDS), 32, 8)
