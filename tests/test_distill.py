"""Slow -> fast distillation: the loss against its formula, and a dual encoder that learns to
retrieve from a reranker teacher alone (no pair labels in its loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycmr.config import ConfigError, config_from_dict
from raycmr.evaluate.metrics import retrieval_metrics
from raycmr.losses.distill import distillation_loss
from raycmr.models.reranker import (
    CrossAttentionReranker,
    RerankerConfig,
    save_reranker,
)
from raycmr.rerank.fit import fit_reranker
from raycmr.train.objective import CrossModalObjective

IMAGE_DIM, TEXT_DIM = 16, 8


def _kl_loop(fast: np.ndarray, slow: np.ndarray, t: float) -> float:
    total = 0.0
    for i in range(fast.shape[0]):
        q = np.exp(slow[i] / t - np.max(slow[i] / t))
        q /= q.sum()
        log_p = fast[i] - np.max(fast[i])
        log_p = log_p - np.log(np.exp(log_p).sum())
        total += sum(q[j] * (np.log(q[j]) - log_p[j]) for j in range(fast.shape[1]))
    return total / fast.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_loss_matches_explicit_kl(temperature: float) -> None:
    rng = np.random.default_rng(0)
    fast, slow = rng.standard_normal((6, 9)) * 2, rng.standard_normal((6, 9)) * 2
    got = distillation_loss(torch.from_numpy(fast), torch.from_numpy(slow), temperature)
    assert float(got) == pytest.approx(_kl_loop(fast, slow, temperature), rel=1e-5)


def test_loss_is_zero_at_the_teacher_and_only_trains_the_student() -> None:
    slow = torch.randn(5, 7, requires_grad=True)
    assert float(distillation_loss(slow.detach() / 2.0, slow, 2.0)) == pytest.approx(0, abs=1e-6)
    fast = torch.randn(5, 7, requires_grad=True)
    loss = distillation_loss(fast, slow, 1.0)
    assert float(loss.detach()) > 0
    loss.backward()
    assert slow.grad is None and fast.grad is not None
    with pytest.raises(ValueError, match="same"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def _pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_feat, image_feat): the text is a fixed linear view of its image plus noise."""
    mix = np.random.default_rng(123).standard_normal((IMAGE_DIM, TEXT_DIM))
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n, IMAGE_DIM))
    text = image @ mix / 4 + 0.1 * rng.standard_normal((n, TEXT_DIM))
    return torch.tensor(text, dtype=torch.float32), torch.tensor(image, dtype=torch.float32)


def _config(reranker: str, **distill) -> dict:
    return {
        "data": {"kind": "features"},
        "model": {"embed_dim": 16,
                  "image": {"kind": "mlp", "input_dim": IMAGE_DIM, "hidden_dims": [32]},
                  "text": {"kind": "mlp", "input_dim": TEXT_DIM, "hidden_dims": [32]}},
        "loss": {"kind": "none", "distill": {"enabled": True, "reranker": reranker, **distill}},
    }


def _t2i_r1(objective: CrossModalObjective, text: torch.Tensor, image: torch.Tensor) -> float:
    objective.eval()
    with torch.no_grad():
        img, txt = objective.encoder({"image_feat": image, "text_feat": text})
    return retrieval_metrics(img.numpy(), txt.numpy(), np.arange(len(text)))["t2i_r1"]


def test_student_learns_to_retrieve_from_the_teacher_alone(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = CrossAttentionReranker(RerankerConfig(
        query="features", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, width=16, heads=2,
        query_tokens=2, image_tokens=2))
    text, image = _pairs(512, seed=1)
    fit_reranker(teacher, {"text_feat": text}, image, steps=150, batch_size=32, lr=1e-2)
    save_reranker(teacher, tmp_path / "teacher")

    cfg = config_from_dict(_config(str(tmp_path / "teacher")))
    torch.manual_seed(0)
    objective = CrossModalObjective(cfg)
    # the teacher is not part of the trained module: no parameters, no checkpoint keys
    assert not any(k.startswith("_teacher") for k in objective.state_dict())
    assert sum(p.numel() for p in objective.parameters()) == sum(
        p.numel() for p in CrossModalObjective(config_from_dict({**_config(""), "loss": {
            "kind": "none"}})).parameters())
    test_text, test_image = _pairs(100, seed=2)  # held out from both teacher and student
    before = _t2i_r1(objective, test_text, test_image)
    opt = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=3e-3)
    train_text, train_image = _pairs(512, seed=3)  # unseen by the teacher
    gen = torch.Generator().manual_seed(0)
    objective.train()
    for _ in range(200):
        rows = torch.randperm(512, generator=gen)[:32]
        out = objective({"image_feat": train_image[rows], "text_feat": train_text[rows],
                         "group": rows, "label": torch.zeros(32, dtype=torch.long)})
        assert set(out) == {"distill", "loss"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = _t2i_r1(objective, test_text, test_image)
    # chance R@1 over 100 images is 1%; the student saw no pair labels, only teacher scores
    print(f"student t2i R@1 before {before:.1f}, after {after:.1f}")
    assert before < 10 and after > 40, (before, after)


def test_distill_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="loss.distill.reranker"):
        config_from_dict(_config(""))
    with pytest.raises(ConfigError, match="data.kind=features"):
        config_from_dict({**_config("x"), "data": {"kind": "images"}})
    with pytest.raises(ConfigError, match="temperature"):
        config_from_dict(_config("x", temperature=0))
    save_reranker(CrossAttentionReranker(RerankerConfig(text_dim=5, image_dim=IMAGE_DIM)),
                  tmp_path / "wrong")
    with pytest.raises(ConfigError, match="train the reranker on the same features"):
        CrossModalObjective(config_from_dict(_config(str(tmp_path / "wrong"))))
    save_reranker(CrossAttentionReranker(RerankerConfig(text_dim=TEXT_DIM, image_dim=IMAGE_DIM,
                                                         fast_weight=10.0)), tmp_path / "residual")
    with pytest.raises(ConfigError, match="--fast-weight 0"):
        CrossModalObjective(config_from_dict(_config(str(tmp_path / "residual"))))
