"""The towers of raycmr/models/towers.py: shapes, gradients, attention pooling against an
explicit softmax, the frozen MiniLM's memoised token states, and kind/pool checks."""

import math

import pytest
import torch

from raycmr.config import ConfigError, TowerConfig, load_config
from raycmr.data.text import load_text_encoder
from raycmr.models.towers import ConvTower, QueryPool, build_tower


@pytest.mark.parametrize("pool,width", [("flatten", 64), ("attention", 32), ("mean", 32)])
def test_cnn_tower_shapes_and_gradients(pool, width):
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(kind="cnn", channels=[8, 16, 32, 32], grid=8, pool=pool,
                                    out_dim=64, heads=4), "image")
    assert isinstance(tower, ConvTower) and tower.out_dim == width
    x = torch.randn(3, 3, 64, 64)
    out = tower(x)
    assert out.shape == (3, width)
    out.square().sum().backward()
    first_conv = tower.backbone[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is not None for p in tower.head.parameters())


def test_cnn_flatten_sees_where_things_are():
    """A blob on the left and the same blob on the right: the mean pool of a conv net cannot
    tell them apart (translation equivariant convs, then a mean away from the borders); the
    flatten head can."""
    torch.manual_seed(0)
    left, right = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    left[..., 28:36, 16:24] = 1.0
    right[..., 28:36, 40:48] = 1.0
    cfg = {"kind": "cnn", "channels": [4, 8, 8, 8], "grid": 8, "out_dim": 16}
    mean = build_tower(TowerConfig(pool="mean", **cfg), "image").eval()
    flat = build_tower(TowerConfig(pool="flatten", **cfg), "image").eval()
    with torch.no_grad():
        assert torch.allclose(mean(left), mean(right), atol=1e-6)
        assert (flat(left) - flat(right)).abs().max() > 1e-3


def test_query_pool_equals_explicit_softmax_and_ignores_padding():
    torch.manual_seed(0)
    pool = QueryPool(8, 1).eval()
    tokens = torch.randn(2, 5, 8)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    out = pool(tokens, pad)
    w_q, w_k, w_v = pool.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = pool.attn.in_proj_bias.chunk(3)
    q = pool.query[0, 0] @ w_q.t() + b_q
    for b in range(2):
        keep = ~pad[b]
        k = tokens[b, keep] @ w_k.t() + b_k
        v = tokens[b, keep] @ w_v.t() + b_v
        attn = torch.softmax(k @ q / math.sqrt(8), dim=0)
        expected = pool.attn.out_proj(attn @ v)
        assert torch.allclose(out[b], expected, atol=1e-5)
    moved = tokens.clone()
    moved[0, 3:] = 100.0  # padding positions change: the pooled vector does not
    assert torch.allclose(pool(moved, pad)[0], out[0], atol=1e-6)


@pytest.fixture(scope="module")
def minilm_batch():
    ids, mask = load_text_encoder("minilm")(
        ["a red circle on the left", "two small blue squares at the top and a cross",
         "a red circle on the left"], 16)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def test_frozen_minilm_attention_tower(minilm_batch):
    ids, mask = minilm_batch
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(kind="minilm", pool="attention", freeze=True, heads=4),
                        "text")
    tower.train()
    assert not tower.model.training  # frozen backbone: no dropout
    out = tower(ids, mask)
    assert out.shape == (3, 384)
    out.square().sum().backward()
    assert all(p.grad is None for p in tower.model.parameters())
    assert all(p.grad is not None for p in tower.head.parameters())
    # the memoised states equal the backbone's own on the padded batch (padding ignored)
    assert len(tower._cache) == 2  # the repeated caption computed once
    with torch.no_grad():
        direct = tower.model(input_ids=ids, attention_mask=mask).last_hidden_state
        cached = tower.token_states(ids, mask)
    valid = mask.bool()
    assert torch.allclose(cached[valid], direct[valid], atol=1e-5)
    assert torch.equal(cached[~valid], torch.zeros_like(cached[~valid]))


def test_fine_tuned_minilm_gets_gradients(minilm_batch):
    ids, mask = minilm_batch
    tower = build_tower(TowerConfig(kind="minilm", pool="mean"), "text")
    tower(ids, mask).sum().backward()
    assert tower.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert tower._cache == {}


@pytest.mark.parametrize("modality,kind,pool,key", [
    ("text", "cnn", "auto", "model.text.kind=cnn"),
    ("image", "minilm", "auto", "model.image.kind=minilm"),
    ("image", "cnn", "bogus", "model.image.pool=bogus"),
    ("image", "hf_config", "attention", "model.image.pool=attention"),
])
def test_tower_kind_and_pool_mismatch_names_the_key(modality, kind, pool, key):
    with pytest.raises(ConfigError) as err:
        build_tower(TowerConfig(kind=kind, pool=pool, hf_config={"model_type": "vit"}), modality)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_unknown_tower_kind_in_config_names_the_key():
    with pytest.raises(ConfigError, match="model.image.kind"):
        load_config("quickstart", ["model.image.kind=resnet9000"])
