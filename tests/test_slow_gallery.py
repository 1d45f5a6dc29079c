"""The slow model's gallery scoring (cross-attention keys/values of phi(x) cached once per image,
the caption's first self-attention once per query) against the plain pair-by-pair score."""

from __future__ import annotations

import pytest
import torch

from raycmr.config import SlowConfig
from raycmr.models.slow import build_slow_model


def _captions(q: int, t: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(q, t, dtype=torch.long)
    mask = torch.zeros(q, t, dtype=torch.long)
    for i in range(q):
        n = int(torch.randint(2, t + 1, (1,), generator=gen))
        ids[i, :n] = torch.randint(1000, 1030, (n,), generator=gen)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("bidirectional,length_norm,layers", [(False, False, 2), (True, True, 1),
                                                              (True, False, 3)])
def test_gallery_scores_equal_pair_scores(bidirectional: bool, length_norm: bool,
                                          layers: int) -> None:
    torch.manual_seed(0)
    cfg = SlowConfig(width=32, heads=4, decoder_layers=layers, bidirectional=bidirectional,
                     length_norm=length_norm)
    model = build_slow_model(cfg, torch.arange(1000, 1030), 32, 12).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        phi = model.encode_image(torch.randn(9, 3, 32, 32, generator=gen))
    ids, mask = _captions(5, 12, gen)
    cand = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(5)])  # [5, 4]
    want = model.score_candidates(phi[cand], ids, mask)
    gallery = model.gallery(phi)
    got = model.score_gallery(gallery, cand, ids, mask)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # chunked by query, and every image for every query (the slow-only layout)
    every = torch.arange(9).expand(5, 9)
    torch.testing.assert_close(model.score_gallery(gallery, every, ids, mask, chunk=10),
                               model.score_candidates(phi, ids, mask), rtol=1e-4, atol=1e-4)
    # a gallery's rows reordered score as those rows
    rows = torch.tensor([3, 1, 4])
    with torch.no_grad():
        one = [float(model.score(phi[r:r + 1], ids[:1], mask[:1])) for r in (3, 4)]
    torch.testing.assert_close(
        model.score_gallery(gallery.select(rows), torch.tensor([[0, 2]]), ids[:1], mask[:1]),
        want.new_tensor([one]),
        rtol=1e-4, atol=1e-4)
