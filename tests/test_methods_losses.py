"""GRL adversary, DSCMR, MMD and semantic losses against formulas written out with plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raycmr.losses.adversary import (
    grad_reverse,
    grl_lambda,
    modality_adversary_loss,
    modality_confusion_losses,
)
from raycmr.losses.dscmr import dscmr_loss
from raycmr.losses.mmd import mmd2_unbiased, pairwise_constraint
from raycmr.losses.semantic import semantic_loss
from raycmr.models.adversary import ModalityDiscriminator

# ----------------------------------------------------------------------------------------- GRL


def test_grad_reverse_forward_is_identity() -> None:
    x = torch.randn(5, 3)
    assert torch.equal(grad_reverse(x, 0.7), x)


@pytest.mark.parametrize("lambd", [0.0, 0.37, 1.0, 2.5])
def test_grad_reverse_gradient_is_minus_lambda_times_plain(lambd: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    x = torch.randn(4, 3, requires_grad=True)
    (x.pow(3) * w).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    (grad_reverse(x, lambd).pow(3) * w).sum().backward()
    assert torch.equal(x.grad, -lambd * plain)
    assert plain.abs().sum() > 0


def test_grl_schedules_at_hand_computed_points() -> None:
    for p in (0.0, 0.3, 1.0):
        assert grl_lambda("constant", progress=p, samples_seen=10**6, lambda_=0.3) == 0.3
    # dann: alpha * (2 / (1 + exp(-gamma p)) - 1) = alpha * tanh(gamma p / 2)
    kw = {"alpha": 0.5, "gamma": 10.0}
    assert grl_lambda("dann", progress=0.0, **kw) == 0.0
    assert grl_lambda("dann", progress=0.5, **kw) == pytest.approx(0.5 * 0.9866142981514303, 1e-12)
    assert grl_lambda("dann", progress=1.0, **kw) == pytest.approx(0.5 * 0.9999092042625951, 1e-12)
    assert grl_lambda("dann", progress=3.0, **kw) == grl_lambda("dann", progress=1.0, **kw)
    # dynamic: alpha * min(1, samples_seen / ramp_samples)
    kw = {"alpha": 0.8, "ramp_samples": 1000}
    assert grl_lambda("dynamic", samples_seen=0, **kw) == 0.0
    assert grl_lambda("dynamic", samples_seen=250, **kw) == pytest.approx(0.2, abs=1e-15)
    assert grl_lambda("dynamic", samples_seen=999, **kw) == pytest.approx(0.7992, abs=1e-15)
    assert grl_lambda("dynamic", samples_seen=1000, **kw) == pytest.approx(0.8, abs=1e-15)
    assert grl_lambda("dynamic", samples_seen=50_000, **kw) == pytest.approx(0.8, abs=1e-15)
    with pytest.raises(ValueError, match="unknown GRL schedule 'linear'"):
        grl_lambda("linear")


def _fixed_disc(num_logits: int) -> nn.Module:
    """Linear discriminator on 2-D inputs: text logit = x[0] (two-logit: logits (0, x[0]))."""
    lin = nn.Linear(2, num_logits)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[num_logits - 1, 0] = 1.0
    return lin


@pytest.mark.parametrize("num_logits", [1, 2])
def test_adversary_loss_and_accuracy_match_hand_values(num_logits: int) -> None:
    disc = _fixed_disc(num_logits)
    img = torch.tensor([[-1.0, 0.0], [-2.0, 5.0], [0.5, 0.0]])  # 2 of 3 right (x0 < 0 -> image)
    txt = torch.tensor([[1.0, 0.0], [3.0, -1.0], [-0.5, 2.0], [2.0, 0.0]])  # 3 of 4 right
    loss, acc = modality_adversary_loss(disc, img, txt, lambd=1.0)
    assert acc.dtype == torch.float32 and acc.item() == pytest.approx(5 / 7, abs=1e-7)
    # -log P(correct) with P(text) = sigmoid(x0) for both heads (softmax of (0, x0) = sigmoid)
    terms = [-math.log(1 - 1 / (1 + math.exp(-r[0]))) for r in img.tolist()]
    terms += [-math.log(1 / (1 + math.exp(-r[0]))) for r in txt.tolist()]
    assert loss.item() == pytest.approx(sum(terms) / 7, abs=1e-6)


def test_adversary_reverses_encoder_gradient_but_not_discriminator_gradient() -> None:
    torch.manual_seed(1)
    disc = ModalityDiscriminator(6, 8)
    img = torch.randn(5, 6, requires_grad=True)
    txt = torch.randn(4, 6, requires_grad=True)
    # plain CE (no GRL), written independently
    logits = disc(torch.cat([img, txt]))
    target = torch.tensor([0] * 5 + [1] * 4)
    F.cross_entropy(logits, target).backward()
    plain_img, plain_txt = img.grad.clone(), txt.grad.clone()
    plain_disc = [p.grad.clone() for p in disc.parameters()]
    img.grad = txt.grad = None
    disc.zero_grad()
    loss, _ = modality_adversary_loss(disc, img, txt, lambd=0.5)
    loss.backward()
    torch.testing.assert_close(img.grad, -0.5 * plain_img, rtol=0, atol=1e-7)
    torch.testing.assert_close(txt.grad, -0.5 * plain_txt, rtol=0, atol=1e-7)
    for p, g in zip(disc.parameters(), plain_disc):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-7)


def test_discriminator_learns_separable_modalities() -> None:
    torch.manual_seed(2)
    mu = torch.zeros(8)
    mu[0] = 2.0
    img = torch.randn(64, 8) * 0.5 + mu
    txt = torch.randn(64, 8) * 0.5 - mu
    disc = ModalityDiscriminator(8, 16)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    _, acc0 = modality_adversary_loss(disc, img, txt, 1.0)
    assert acc0.item() < 0.9  # untrained: not separating yet
    for _ in range(100):
        opt.zero_grad()
        loss, acc = modality_adversary_loss(disc, img, txt, 1.0)
        loss.backward()
        opt.step()
    loss, acc = modality_adversary_loss(disc, img, txt, 1.0)
    assert acc.item() == 1.0  # means 4 sigma apart: a linear separator exists
    assert loss.item() < 0.05


def _x0_disc(num_logits: int) -> ModalityDiscriminator:
    """ModalityDiscriminator on 2-D inputs whose text logit is x[0]: hidden relu(x0), relu(-x0),
    text logit h0 - h1 (two-logit head: logits (0, x0))."""
    disc = ModalityDiscriminator(2, 2, num_logits)
    with torch.no_grad():
        for p in disc.parameters():
            p.zero_()
        disc.hidden_weight[0, 0], disc.hidden_weight[1, 0] = 1.0, -1.0
        disc.out_weight[num_logits - 1, 0], disc.out_weight[num_logits - 1, 1] = 1.0, -1.0
    return disc


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("num_logits", [1, 2])
def test_confusion_loss_value_and_gradient_match_hand_values(num_logits: int) -> None:
    disc = _x0_disc(num_logits).double()
    img = torch.tensor([[-1.0, 0.0], [0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    txt = torch.tensor([[2.0, 1.0], [0.0, -1.0], [-0.3, 0.0]], dtype=torch.float64,
                       requires_grad=True)
    disc_loss, confusion, acc = modality_confusion_losses(disc, img, txt, label_smoothing=0.2)
    rows = img.tolist() + txt.tolist()
    labels = [0, 0, 1, 1, 1]
    # KL((1/2, 1/2) || (1 - sigmoid(x0), sigmoid(x0))), averaged over the 5 rows
    conf = sum(-0.5 * math.log(_sigmoid(r[0])) - 0.5 * math.log(1 - _sigmoid(r[0]))
               - math.log(2) for r in rows) / 5
    assert confusion.item() == pytest.approx(conf, abs=1e-12)
    # smoothed targets: 0.9 on the true modality, 0.1 on the other
    p_true = [1 - _sigmoid(r[0]) if y == 0 else _sigmoid(r[0]) for r, y in zip(rows, labels)]
    ce = sum(-0.9 * math.log(p) - 0.1 * math.log(1 - p) for p in p_true) / 5
    assert disc_loss.item() == pytest.approx(ce, abs=1e-12)
    assert acc.item() == pytest.approx(2 / 5)  # x0=0.5 (image), x0=0 and -0.3 (texts) wrong
    confusion.backward()
    # d/dx0 of the confusion: (sigmoid(x0) - 1/2) / 5; nothing along x1
    grads = torch.cat([img.grad, txt.grad]).tolist()
    for r, g in zip(rows, grads):
        assert g == pytest.approx([(_sigmoid(r[0]) - 0.5) / 5, 0.0], abs=1e-12)
    assert all(p.grad is None for p in disc.parameters())  # the encoders' loss only
    assert modality_confusion_losses(disc, img.detach() * 0, txt.detach() * 0)[1].item() == \
        pytest.approx(0.0, abs=1e-15)  # at chance the confusion loss is exactly 0


@pytest.mark.parametrize("num_logits", [1, 2])
def test_confusion_update_gradients_equal_the_two_player_reference(num_logits: int) -> None:
    """One backward of L_D + lambda * L_conf gives the discriminator exactly the gradient of its
    own cross-entropy on detached embeddings, and the embeddings exactly lambda times the gradient
    of the confusion loss through a discriminator that is not updated (hand-written autograd)."""
    torch.manual_seed(3)
    disc = ModalityDiscriminator(6, 8, num_logits).double()
    img = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    lambd = 0.37
    params = list(disc.parameters())
    # reference, written independently: player 1 = the discriminator, player 2 = the encoders
    x = torch.cat([img, txt])
    y = torch.tensor([0.0] * 5 + [1.0] * 4, dtype=torch.float64)
    out = disc(x.detach())
    p_text = torch.sigmoid(out[:, 0]) if num_logits == 1 else torch.softmax(out, 1)[:, 1]
    ce = -(y * p_text.log() + (1 - y) * (1 - p_text).log()).mean()
    ref_disc = torch.autograd.grad(ce, params)
    out = disc(x)
    p_text = torch.sigmoid(out[:, 0]) if num_logits == 1 else torch.softmax(out, 1)[:, 1]
    kl = (0.5 * (0.5 / p_text).log() + 0.5 * (0.5 / (1 - p_text)).log()).mean()
    ref_img, ref_txt = torch.autograd.grad(lambd * kl, (img, txt))
    disc_loss, confusion, _ = modality_confusion_losses(disc, img, txt)
    (disc_loss + lambd * confusion).backward()
    for p, g in zip(params, ref_disc):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)
    torch.testing.assert_close(img.grad, ref_img, rtol=0, atol=1e-12)
    torch.testing.assert_close(txt.grad, ref_txt, rtol=0, atol=1e-12)
    assert img.grad.abs().max() > 1e-4  # a real gradient, not zeros on both sides


def test_discriminator_learning_rate_is_its_own_group_through_deepspeeds_schedule() -> None:
    """loss.grl.disc_lr_scale: the discriminator's parameters (and only they) in a group at
    train.lr * scale, and DeepSpeed's WarmupCosineLR (the one raycmr configures) keeps that ratio
    at every step."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from raycmr.config import load_config
    from raycmr.train.dual_encoder.task import DualEncoderTask

    cfg = load_config("wikipedia", ["loss.grl.enabled=true", "loss.grl.disc_lr_scale=3",
                                    "train.lr=0.001"])
    task = DualEncoderTask(cfg, {})
    module = task.build_module()
    rest, disc = task.optimizer_groups(module)
    assert [id(p) for p in disc["params"]] == [id(p) for p in module.discriminator.parameters()]
    assert {id(p) for p in rest["params"]} | {id(p) for p in disc["params"]} == \
        {id(p) for p in module.parameters()} and "lr" not in rest
    opt = torch.optim.AdamW([rest, disc], lr=cfg.train.lr)
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=2, cos_min_ratio=0.01)
    seen = []
    for _ in range(6):
        opt.step()
        sched.step()
        assert opt.param_groups[1]["lr"] == pytest.approx(3 * opt.param_groups[0]["lr"], rel=1e-12)
        seen.append(opt.param_groups[0]["lr"])
    assert len(set(seen)) > 2 and max(seen) > 0  # warm-up and decay both seen
    plain = DualEncoderTask(load_config("wikipedia", ["loss.grl.enabled=true"]), {})
    assert all(isinstance(p, torch.Tensor) for p in plain.optimizer_groups(plain.build_module()))


# --------------------------------------------------------------------------------------- DSCMR


def _dscmr_reference(u, v, p_img, p_txt, y_img, y_txt, alpha, beta, common_weight):
    """DSCMR written with python loops over numpy float64 arrays (y_*: one/multi-hot)."""
    n = u.shape[0]

    def cos(a, b):
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    def nll(a, b, ya, yb):
        s = 0.0
        for i in range(n):
            for j in range(n):
                theta = cos(a[i], b[j]) / 2.0
                sim = 1.0 if float(ya[i] @ yb[j]) > 0 else 0.0
                s += sim * theta - math.log(1.0 + math.exp(theta))
        return -s / n**2

    def mean_row_norm(a, b):
        return sum(math.sqrt(sum((a[i, c] - b[i, c]) ** 2 for c in range(a.shape[1])))
                   for i in range(n)) / n

    parts = {
        "common_ii": nll(u, u, y_img, y_img),
        "common_it": nll(u, v, y_img, y_txt),
        "common_tt": nll(v, v, y_txt, y_txt),
        "label_img": mean_row_norm(p_img, y_img),
        "label_txt": mean_row_norm(p_txt, y_txt),
        "invariance": mean_row_norm(u, v),
    }
    parts["common"] = parts["common_ii"] + parts["common_it"] + parts["common_tt"]
    parts["label"] = parts["label_img"] + parts["label_txt"]
    parts["total"] = (common_weight * parts["common"] + alpha * parts["label"]
                      + beta * parts["invariance"])
    return parts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dscmr_matches_loop_reference_single_label(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    n, d, c = 7, 5, 4
    u, v = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    p_img, p_txt = rng.normal(size=(n, c)), rng.normal(size=(n, c))
    labels = np.array([0, 1, 1, 3, 0, 2, 3])
    y = np.eye(c)[labels]
    ref = _dscmr_reference(u, v, p_img, p_txt, y, y, 0.3, 0.2, 1.0)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=dtype)

    out = dscmr_loss(t(u), t(v), t(p_img), t(p_txt), torch.tensor(labels), alpha=0.3, beta=0.2)
    assert set(out) == set(ref)
    for key, val in ref.items():
        assert out[key].item() == pytest.approx(val, abs=1e-6), key
    assert ref["common_it"] > 0.5  # not a trivially small number


def test_dscmr_multi_hot_text_labels_and_common_weight() -> None:
    rng = np.random.default_rng(4)
    n, d, c = 6, 3, 5
    u, v = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    p_img, p_txt = rng.normal(size=(n, c)), rng.normal(size=(n, c))
    y_img = (rng.random((n, c)) < 0.35).astype(np.float64)
    y_txt = (rng.random((n, c)) < 0.35).astype(np.float64)
    y_img[0] = [1, 1, 1, 0, 0]  # shares 2+ classes with others: S stays binary (1, not a count)
    ref = _dscmr_reference(u, v, p_img, p_txt, y_img, y_txt, 2.0, 0.7, 0.25)
    out = dscmr_loss(*(torch.tensor(a) for a in (u, v, p_img, p_txt, y_img)), alpha=2.0, beta=0.7,
                     txt_labels=torch.tensor(y_txt), common_weight=0.25)
    for key, val in ref.items():
        assert out[key].item() == pytest.approx(val, abs=1e-10), key


def test_dscmr_label_term_is_mean_row_norm_not_frobenius_over_n() -> None:
    # P - Y rows: (3, 4) and (0, 0): mean row norm = 2.5, ||P - Y||_F / n = 5 / 2 = 2.5 too;
    # rows (3, 4) and (6, 8): mean row norm 7.5 vs Frobenius / n = sqrt(125) / 2 = 5.59
    y = torch.tensor([0, 0])
    p = torch.tensor([[4.0, 4.0], [7.0, 8.0]])
    emb = torch.randn(2, 3)
    out = dscmr_loss(emb, emb, p, p, y)
    assert out["label_img"].item() == pytest.approx(7.5, abs=1e-6)
    assert out["invariance"].item() == 0.0


def test_dscmr_gradient_finite_when_modalities_coincide() -> None:
    u = torch.randn(4, 3, requires_grad=True)
    clf = nn.Linear(3, 2)
    out = dscmr_loss(u, u.clone(), clf(u), clf(u), torch.tensor([0, 1, 1, 0]))
    out["total"].backward()
    assert torch.isfinite(u.grad).all()


def test_dscmr_rejects_labels_out_of_range() -> None:
    e = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"DSCMR labels must lie in \[0, 2\)"):
        dscmr_loss(e, e, torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0, 2, 1]))


# ----------------------------------------------------------------------------------------- MMD


def _mmd_reference(x: np.ndarray, y: np.ndarray, sigmas: list[float]) -> float:
    def k(a, b):
        d2 = sum((a[t] - b[t]) ** 2 for t in range(len(a)))
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_matches_loop_reference() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.4
    sigmas = [0.5, 1.0, 2.0]
    ref = _mmd_reference(x, y, sigmas)
    got = mmd2_unbiased(torch.tensor(x), torch.tensor(y), sigmas).item()
    assert got == pytest.approx(ref, abs=1e-10)
    got32 = mmd2_unbiased(torch.tensor(x).float(), torch.tensor(y).float(), sigmas).item()
    assert got32 == pytest.approx(ref, abs=1e-6)
    assert abs(ref) > 0.05


def test_mmd_unbiased_zero_mean_for_identical_distributions() -> None:
    """Mean over R draws is within 4 standard errors of 0 (the sample std of the draws estimates
    the estimator's own spread), so a real bias of the size of the biased V-statistic fails."""
    gen = torch.Generator().manual_seed(6)
    sigmas = [0.5, 1.0, 2.0, 4.0]
    draws, biased = [], []
    for _ in range(300):
        x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(24, 4, generator=gen, dtype=torch.float64)
        draws.append(mmd2_unbiased(x, y, sigmas).item())
        kxx = sum(torch.exp(-torch.cdist(x, x) ** 2 / (2 * s * s)) for s in sigmas)
        kyy = sum(torch.exp(-torch.cdist(y, y) ** 2 / (2 * s * s)) for s in sigmas)
        kxy = sum(torch.exp(-torch.cdist(x, y) ** 2 / (2 * s * s)) for s in sigmas)
        biased.append((kxx.mean() + kyy.mean() - 2 * kxy.mean()).item())
    d = np.array(draws)
    stderr = d.std(ddof=1) / math.sqrt(len(d))
    assert abs(d.mean()) < 4 * stderr
    assert (d < 0).mean() > 0.3  # an unbiased estimate of 0 is often negative
    assert np.mean(biased) > 10 * stderr  # the biased estimator would fail the check above


def test_mmd_grows_with_mean_shift() -> None:
    gen = torch.Generator().manual_seed(7)
    sigmas = [0.5, 1.0, 2.0, 4.0, 8.0]
    shifts = [0.0, 0.5, 1.0, 2.0]
    totals = [0.0] * len(shifts)
    e0 = torch.zeros(4, dtype=torch.float64)
    e0[0] = 1.0
    for _ in range(10):
        x = torch.randn(48, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(48, 4, generator=gen, dtype=torch.float64)
        for k, s in enumerate(shifts):
            totals[k] += mmd2_unbiased(x, y + s * e0, sigmas).item() / 10
    assert totals[0] < totals[1] < totals[2] < totals[3]
    # for small shifts MMD^2 grows ~ quadratically (4x per doubling); ask for clearly more than 2x
    assert totals[2] > 2 * totals[1] and totals[3] > 2 * totals[2]


def test_mmd_gradient_finite_and_rejects_single_row() -> None:
    x = torch.randn(6, 3, requires_grad=True)
    mmd2_unbiased(x, x.detach() + 0.1, [1.0]).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd2_unbiased(torch.randn(1, 3), torch.randn(4, 3), [1.0])


def test_pairwise_constraint_matches_loop_and_zero_gradient_is_finite() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    ref = sum(math.sqrt(sum((a[i, t] - b[i, t]) ** 2 for t in range(4))) for i in range(5)) / 5
    assert pairwise_constraint(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(ref, 1e-12)
    x = torch.randn(3, 2, requires_grad=True)
    pairwise_constraint(x, x.detach().clone()).backward()
    assert torch.equal(x.grad, torch.zeros(3, 2))


# ------------------------------------------------------------------------------------ semantic


def test_semantic_loss_ignores_minus_one_rows() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [5.0, -5.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, -1, 2, 1])
    ref = 0.0
    for i in (0, 2, 3):
        row = logits[i].tolist()
        ref += -(row[int(labels[i])] - math.log(sum(math.exp(z) for z in row)))
    assert semantic_loss(logits, labels).item() == pytest.approx(ref / 3, abs=1e-6)


def test_semantic_loss_all_ignored_is_zero_with_gradient_path() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss = semantic_loss(logits, torch.full((3,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"must be -1 \(ignored\) or lie in \[0, 4\)"):
        semantic_loss(logits, torch.tensor([0, 4, -1]))
