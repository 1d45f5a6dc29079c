"""Slow -> fast distillation: the loss against its formula, and a dual encoder that learns to
retrieve from a feature teacher alone (no pair labels in its loss); with the captioning slow
model as teacher on image shards, the loss over each caption's positive + m hardest in-batch
images against explicit loops, the teacher's pair count and its frozen weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raycmr.artifacts import save_feature_teacher
from raycmr.config import ConfigError, config_from_dict, load_config, with_overrides
from raycmr.evaluate.metrics import retrieval_metrics
from raycmr.losses.distill import (
    distillation_loss,
    hardest_candidates,
    restricted_distillation_loss,
)
from raycmr.models.feature_teacher import FeatureTeacher, FeatureTeacherConfig
from raycmr.teacher.fit import fit_teacher
from raycmr.train.dual_encoder.objective import CrossModalObjective, load_teacher

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


def _config(teacher: str, **distill) -> dict:
    return {
        "data": {"kind": "features"},
        "model": {"embed_dim": 16,
                  "image": {"kind": "mlp", "input_dim": IMAGE_DIM, "hidden_dims": [32]},
                  "text": {"kind": "mlp", "input_dim": TEXT_DIM, "hidden_dims": [32]}},
        "loss": {"kind": "none", "distill": {"enabled": True, "feature_teacher": teacher,
                                                **distill}},
    }


def _t2i_r1(objective: CrossModalObjective, text: torch.Tensor, image: torch.Tensor) -> float:
    objective.eval()
    with torch.no_grad():
        img, txt = objective.encoder({"image_feat": image, "text_feat": text})
    return retrieval_metrics(img.numpy(), txt.numpy(), np.arange(len(text)))["t2i_r1"]


def test_student_learns_to_retrieve_from_the_teacher_alone(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = FeatureTeacher(FeatureTeacherConfig(
        query="features", text_dim=TEXT_DIM, image_dim=IMAGE_DIM, width=16, heads=2,
        query_tokens=2, image_tokens=2))
    text, image = _pairs(512, seed=1)
    fit_teacher(teacher, {"text_feat": text}, image, steps=150, batch_size=32, lr=1e-2)
    save_feature_teacher(teacher, tmp_path / "teacher")

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
    with pytest.raises(ConfigError, match="loss.distill.feature_teacher"):
        config_from_dict(_config(""))
    with pytest.raises(ConfigError, match="data.kind=features"):
        config_from_dict({**_config("x"), "data": {"kind": "images"}})
    with pytest.raises(ConfigError, match="temperature"):
        config_from_dict(_config("x", temperature=0))
    with pytest.raises(ConfigError, match="^loss.distill.reranker was renamed "
                                          "loss.distill.feature_teacher: set "
                                          "loss.distill.feature_teacher=x instead$"):
        load_config("wikipedia", ["loss.distill.enabled=true", "loss.distill.reranker=x"])
    save_feature_teacher(FeatureTeacher(FeatureTeacherConfig(text_dim=5, image_dim=IMAGE_DIM)),
                         tmp_path / "wrong")
    with pytest.raises(ConfigError, match="train the teacher on the same features"):
        CrossModalObjective(config_from_dict(_config(str(tmp_path / "wrong"))))
    save_feature_teacher(FeatureTeacher(FeatureTeacherConfig(text_dim=TEXT_DIM,
                                                             image_dim=IMAGE_DIM,
                                                             fast_weight=10.0)),
                         tmp_path / "residual")
    with pytest.raises(ConfigError, match="--fast-weight 0"):
        CrossModalObjective(config_from_dict(_config(str(tmp_path / "residual"))))


# ------------------------------------------- the captioning slow model as teacher (image shards)


def _restricted_loop(fast: list[list[float]], slow_of, group: list[int], m: int,
                     t: float) -> tuple[float, list[list[int]]]:
    """Explicit loops: each row's candidates (its column, then its m highest-scoring columns of
    other groups, ties to the lower column) and the mean KL over them; ``slow_of(i, j)`` is the
    teacher's score of caption i with image j."""
    total, chosen = 0.0, []
    for i, row in enumerate(fast):
        others = [j for j in range(len(row)) if j != i and group[j] != group[i]]
        others.sort(key=lambda j: (-row[j], j))
        cand = [i] + others[:m]
        chosen.append(cand)
        s = [slow_of(i, j) / t for j in cand]
        f = [row[j] for j in cand]
        zq = sum(math.exp(v) for v in s)
        zp = sum(math.exp(v) for v in f)
        total += sum(math.exp(s[c]) / zq * (s[c] - math.log(zq) - (f[c] - math.log(zp)))
                     for c in range(len(cand)))
    return total / len(fast), chosen


def test_restricted_loss_hand_computed() -> None:
    # m = 1: caption 0's hardest other image is column 2 (fast 0.7 > 0.2); the teacher ties
    # its two candidates (q = 1/2, 1/2) while the fast logits [0, ln 3] give p = 1/4, 3/4:
    # KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3)
    fast = torch.tensor([[0.0, 0.2, math.log(3.0)]])
    cand, valid = hardest_candidates(fast, torch.tensor([0]), 1)
    assert cand.tolist() == [[0, 2]] and valid.all()
    loss = restricted_distillation_loss(fast, torch.tensor([[-5.0, -5.0]]), cand, 1.0, valid)
    assert float(loss) == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)
    assert 0.5 * math.log(4.0 / 3.0) == pytest.approx(0.143841, abs=1e-6)


@pytest.mark.parametrize("m,t", [(1, 1.0), (3, 0.5), (5, 2.0)])
def test_restricted_loss_matches_explicit_loops(m: int, t: float) -> None:
    rng = np.random.default_rng(m)
    b = 7
    fast = rng.standard_normal((b, b)) * 3
    table = rng.standard_normal((b, b)) * 4  # the teacher's score of (caption i, image j)
    group = [0, 1, 2, 2, 3, 4, 5]  # captions 2 and 3 share an image: never each other's negative
    want, chosen = _restricted_loop(fast.tolist(), lambda i, j: float(table[i, j]), group, m, t)
    g = torch.tensor(group)
    same = (g[:, None] == g[None, :]) & ~torch.eye(b, dtype=torch.bool)
    cand, valid = hardest_candidates(torch.from_numpy(fast), torch.arange(b), m, same)
    assert [c[:len(want_c)] for c, want_c in zip(cand.tolist(), chosen)] == chosen
    # rows 2 and 3 have one admissible negative fewer: the filler is invalid when m reaches it
    assert valid.sum(1).tolist() == [len(c) for c in chosen]
    slow = torch.from_numpy(table).gather(1, cand)
    fast_t = torch.from_numpy(fast).requires_grad_(True)
    got = restricted_distillation_loss(fast_t, slow, cand, t, valid)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert torch.isfinite(fast_t.grad).all()
    # columns outside a row's candidates get no gradient, those inside do
    for i in range(b):
        for j in range(b):
            assert (float(fast_t.grad[i, j]) != 0.0) == (j in chosen[i]), (i, j)
    with pytest.raises(ValueError, match="1 <= m"):
        hardest_candidates(torch.zeros(3, 3), torch.arange(3), 3)


def _slow_teacher_setup(tmp_path, batch: int = 6, **distill):
    """A tiny random slow model exported as a checkpoint and a dual encoder config that
    distils from it (32 px images, 16 tokens)."""
    from raycmr.artifacts import write_export
    from raycmr.configs.tiny import TINY_SLOW, TINY_TOWERS
    from raycmr.models.slow import build_slow_model

    common = ["data.image_size=32", "data.max_text_len=16", *TINY_SLOW]
    slow_cfg = load_config("quickstart_slow", common)
    torch.manual_seed(0)
    slow = build_slow_model(slow_cfg.slow, torch.arange(1000, 1100), 32, 16).eval()
    (tmp_path / "slow").mkdir(exist_ok=True)
    write_export(tmp_path / "slow", slow.state_dict(), slow_cfg, {})
    over = {"hard_negatives": 2, **distill}
    cfg = load_config("quickstart", common + [
        "model.embed_dim=16", f"train.batch_size={batch}",
        *TINY_TOWERS,
        "loss.distill.enabled=true", f"loss.distill.slow={tmp_path / 'slow'}",
        *(f"loss.distill.{k}={v}" for k, v in over.items())])
    return cfg, slow


def _image_batch(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (b,), generator=gen)
    ids = torch.zeros(b, 16, dtype=torch.long)
    mask = torch.zeros(b, 16, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.cat([torch.tensor([101]), torch.randint(1000, 1100, (n - 2,),
                                                                   generator=gen),
                                torch.tensor([102])])
        mask[i, :n] = 1
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=gen), "input_ids": ids,
            "attention_mask": mask, "group": torch.arange(b)}


def test_slow_teacher_scores_b_times_m_plus_1_pairs_and_gets_no_gradient(tmp_path) -> None:
    b, m = 6, 2
    cfg, reference = _slow_teacher_setup(tmp_path, batch=b, hard_negatives=m)
    objective = CrossModalObjective(cfg).eval()  # no dropout: the reference below sees the same
    assert not any(k.startswith("_teacher") for k in objective.state_dict())
    (teacher,) = objective._teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    pairs, images = [], []
    score, encode = teacher.score_gallery, teacher.encode_image

    def counted(gallery, candidates, ids, mask):
        pairs.append(tuple(candidates.shape))
        return score(gallery, candidates, ids, mask)

    teacher.score_gallery = counted
    teacher.encode_image = lambda px: images.append(px.shape[0]) or encode(px)
    batch = _image_batch(b)
    out = objective(batch)
    assert pairs == [(b, m + 1)] and images == [b]  # B * (m + 1) pairs, phi once per image
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for p in objective.encoder.parameters())

    # the loss equals the explicit loops over the teacher's own pair scores
    with torch.no_grad():
        img, txt = objective.encoder(batch)
        fast = (objective.encoder.logit_scale.clamp(max=math.log(100)).exp()
                * (txt @ img.t())).tolist()
        phi = reference.encode_image(batch["pixel_values"])

        def slow_of(i: int, j: int) -> float:
            return float(reference.score(phi[j:j + 1], batch["input_ids"][i:i + 1],
                                         batch["attention_mask"][i:i + 1]))

        want, _ = _restricted_loop(fast, slow_of, list(range(b)), m, 1.0)
    assert float(out["distill"]) == pytest.approx(want, rel=1e-4)

    # before loss.distill.start the teacher is not called and the loss is InfoNCE alone
    late = CrossModalObjective(with_overrides(cfg, {"loss.distill.start": 0.5})).eval()
    late.load_state_dict(objective.state_dict())
    late._teacher[0].score_gallery = counted
    pairs.clear()
    early = late(batch, progress=0.4)
    assert pairs == [] and float(early["distill"]) == 0.0
    assert float(early["loss"].detach()) == pytest.approx(float(early["contrastive"]), rel=1e-6)
    assert late(batch, progress=0.5)["distill"] == pytest.approx(float(out["distill"]), rel=1e-5)
    assert pairs == [(b, m + 1)]


def test_a_distilled_run_is_the_undistilled_one_until_the_term_starts(tmp_path) -> None:
    """Loading the teacher draws no random numbers from the run's streams (same seed: the same
    initial weights and the same dropout as without a teacher), and random candidates draw
    from their own generator."""
    cfg, _ = _slow_teacher_setup(tmp_path, candidates="random", start=0.5)
    plain_cfg = with_overrides(cfg, {"loss.distill.enabled": False})
    batch = _image_batch(6)
    runs = []
    for c in (plain_cfg, cfg):
        torch.manual_seed(3)
        objective = CrossModalObjective(c).train()  # dropout on: it draws from the stream
        runs.append((objective.state_dict(), objective(batch, progress=0.4)["loss"].detach(),
                     torch.rand(4)))
    (plain_state, plain_loss, plain_next), (state, loss, after) = runs
    assert plain_state.keys() == state.keys()
    assert all(torch.equal(plain_state[k], state[k]) for k in state)
    assert torch.equal(plain_loss, loss) and torch.equal(plain_next, after)

    draws = []
    for c, progress in ((plain_cfg, 0.6), (cfg, 0.6)):  # the term on, candidates drawn
        torch.manual_seed(3)
        out = CrossModalObjective(c).eval()(batch, progress=progress)
        draws.append(torch.rand(4))
    assert float(out["distill"]) > 0
    assert torch.equal(draws[0], draws[1])


def test_slow_teacher_config_errors(tmp_path) -> None:
    cfg, _ = _slow_teacher_setup(tmp_path)
    with pytest.raises(ConfigError, match="hard_negatives is 6"):
        with_overrides(cfg, {"loss.distill.hard_negatives": 6})
    with pytest.raises(ConfigError, match="0 <= start < 1"):
        with_overrides(cfg, {"loss.distill.start": 1.0})
    with pytest.raises(ConfigError, match="one teacher"):
        with_overrides(cfg, {"loss.distill.feature_teacher": "x"})
    with pytest.raises(ConfigError, match="data.kind=images"):
        config_from_dict({**_config(""), "loss": {"kind": "none", "distill": {
            "enabled": True, "slow": "x"}}})
    with pytest.raises(ConfigError, match="data.image_size=64"):
        CrossModalObjective(with_overrides(cfg, {"data.image_size": 64}))
    with pytest.raises(ConfigError, match="data.tokenizer='bert'"):
        load_teacher(with_overrides(cfg, {"data.tokenizer": "bert"}))
    with pytest.raises(ConfigError, match="vocab_size 500"):
        load_teacher(with_overrides(cfg, {"model.text.hf_config": {
            **cfg.model.text.hf_config, "vocab_size": 500}}))
    fast = load_config("quickstart", [])
    with pytest.raises(ConfigError, match="not a slow model"):
        from raycmr.artifacts import write_export
        from raycmr.models.dual_encoder import DualEncoder

        write_export(tmp_path / "fast", DualEncoder(fast.model).state_dict(), fast, {})
        load_teacher(with_overrides(cfg, {"loss.distill.slow": str(tmp_path / "fast")}))
