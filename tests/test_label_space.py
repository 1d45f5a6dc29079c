"""Label-space retrieval: embeddings whose dot product is P(same class), checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics import ap_by_loop

from raycmr.config import ConfigError, load_config
from raycmr.evaluate.metrics import average_precision_per_query
from raycmr.models.dual_encoder import DualEncoder, label_space_embedding, retrieval_dim


def _softmax(x: np.ndarray, t: float) -> np.ndarray:
    z = np.exp((x - x.max(axis=1, keepdims=True)) / t)
    return z / z.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_dot_product_is_posterior_inner_product(temperature: float) -> None:
    rng = np.random.default_rng(0)
    li, lt = rng.standard_normal((7, 4)) * 3, rng.standard_normal((9, 4)) * 3
    ei = label_space_embedding(torch.from_numpy(li), "image", temperature).numpy()
    et = label_space_embedding(torch.from_numpy(lt), "text", temperature).numpy()
    pi, pt = _softmax(li, temperature), _softmax(lt, temperature)
    expected = np.array([[sum(pi[a, c] * pt[b, c] for c in range(4)) for b in range(9)]
                         for a in range(7)])
    np.testing.assert_allclose(ei @ et.T, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(ei, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(et, axis=1), 1.0, rtol=1e-12)
    assert ei.shape == (7, 6) and et.shape == (9, 6)


def test_hand_case() -> None:
    # A confident image (class 0) and an unsure text (0.5 / 0.5): P(same class) = 0.5.
    # The text's padding is sqrt(1 - 0.5) on its own coordinate, orthogonal to the image's.
    big = 50.0
    ei = label_space_embedding(torch.tensor([[big, -big]], dtype=torch.float64), "image")
    et = label_space_embedding(torch.tensor([[0.0, 0.0]], dtype=torch.float64), "text")
    np.testing.assert_allclose(ei.numpy(), [[1.0, 0.0, 0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(et.numpy(), [[0.5, 0.5, 0.0, np.sqrt(0.5)]], atol=1e-12)
    assert float(ei @ et.T) == pytest.approx(0.5)


def test_metrics_rank_by_probability_of_same_class() -> None:
    """mAP computed by the cosine-based metrics on label-space embeddings equals AP from an
    explicit loop that ranks the gallery by sum_c p(c|q) p(c|g)."""
    rng = np.random.default_rng(1)
    lq, lg = rng.standard_normal((20, 3)) * 2, rng.standard_normal((40, 3)) * 2
    ql, gl = rng.integers(0, 3, 20), rng.integers(0, 3, 40)
    pq, pg = _softmax(lq, 1.0), _softmax(lg, 1.0)
    same_class = [[sum(pq[i, c] * pg[j, c] for c in range(3)) for j in range(40)]
                  for i in range(20)]
    expected = ap_by_loop(same_class, ql, gl)
    eq = label_space_embedding(torch.from_numpy(lq), "text").numpy()
    eg = label_space_embedding(torch.from_numpy(lg), "image").numpy()
    ap = average_precision_per_query(eq, eg, ql, gl)
    np.testing.assert_allclose(ap, expected, rtol=1e-10)


def test_dual_encoder_retrieval_space() -> None:
    common = load_config("wikipedia", ["model.retrieval_space=common"])
    label = load_config("wikipedia", ["model.retrieval_space=label", "model.label_temperature=0.5"])
    torch.manual_seed(0)
    enc = DualEncoder(label.model).eval()
    batch = {"image_feat": torch.rand(5, 128), "text_feat": torch.rand(5, 10)}
    with torch.no_grad():
        img, txt = enc(batch)
        ri, rt = enc.retrieval_embed(batch)
        assert ri.shape == (5, retrieval_dim(label.model)) == (5, 12)
        np.testing.assert_allclose(
            ri.numpy(), label_space_embedding(enc.classifier(img), "image", 0.5).numpy())
        np.testing.assert_allclose(
            rt.numpy(), label_space_embedding(enc.classifier(txt), "text", 0.5).numpy())
        enc.retrieval_space = "common"
        ci, ct = enc.retrieval_embed(batch)
    assert torch.equal(ci, img) and torch.equal(ct, txt)
    assert retrieval_dim(common.model) == common.model.embed_dim


def test_label_space_needs_classes() -> None:
    with pytest.raises(ConfigError, match="model.num_classes"):
        load_config("quickstart", ["model.retrieval_space=label"])
    with pytest.raises(ConfigError, match="label_temperature"):
        load_config("wikipedia", ["model.label_temperature=0"])
