"""The MH warm-up hand-over loss against an explicit-loop reference, its limit cases, the
objective's hook, and the clamp of InfoNCE's logit scale at ln(100)."""

import math

import pytest
import torch

from raycmr.config import ConfigError, load_config
from raycmr.distributed import GlobalBatch, end_spawned_process, local_batch
from raycmr.losses.contrastive import MAX_LOGIT_SCALE, infonce_loss, vse_loss
from raycmr.losses.handover import handover_weight, smooth_mh_loss, vse_mh_handover_loss
from tests.test_contrastive import _emb, infonce_reference, vse_reference


def test_handover_weight_by_hand():
    assert handover_weight(0.0, 0.1, 0.5) == 0.0
    assert handover_weight(0.1, 0.1, 0.5) == 0.0
    assert handover_weight(0.3, 0.1, 0.5) == pytest.approx(0.5)  # half-way: (1 - cos(pi/2)) / 2
    assert handover_weight(0.2, 0.1, 0.5) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert handover_weight(0.5, 0.1, 0.5) == 1.0
    assert handover_weight(0.9, 0.1, 0.5) == 1.0
    assert handover_weight(0.0, 0.0, 0.0) == 1.0  # no hand-over window: MH from the start


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.7, 1.0])
@pytest.mark.parametrize("warmup", ["vse_sh", "infonce"])
def test_handover_matches_loop_reference(warmup, weight):
    img, txt = _emb(10, 6, 11), _emb(10, 6, 12)
    groups = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5, 6, 7])
    scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)
    out = vse_mh_handover_loss(local_batch(img, txt, groups), warmup=warmup, weight=weight,
                               margin=0.2, logit_scale=scale)
    g = groups.tolist()
    warm = vse_reference(img, txt, g, 0.2, hardest=False) if warmup == "vse_sh" \
        else infonce_reference(img, txt, g, 1 / 0.07)
    ref = (1 - weight) * warm + weight * vse_reference(img, txt, g, 0.2, hardest=True)
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("warmup", ["vse_sh", "infonce", "none"])
def test_limit_cases_are_exactly_mh_and_the_warmup_loss(warmup):
    # 16 candidates from two workers, this worker's 12 anchors first, denominator N/W
    img, txt = _emb(16, 8, 13), _emb(16, 8, 14)
    batch = GlobalBatch(img, txt, torch.arange(16), start=0, stop=12, denominator=8.0,
                        sizes=(12, 4))
    scale = torch.tensor([2.0], dtype=torch.float64)
    done = vse_mh_handover_loss(batch, warmup=warmup, weight=1.0, margin=0.3, logit_scale=scale)
    mh = vse_loss(batch, margin=0.3, hardest=True)
    assert torch.equal(done.loss, mh.loss)
    assert torch.equal(done.hardest_neg_sim, mh.hardest_neg_sim)
    start = vse_mh_handover_loss(batch, warmup=warmup, weight=0.0, margin=0.3, logit_scale=scale)
    if warmup == "vse_sh":
        expected = vse_loss(batch, margin=0.3, hardest=False).loss
    elif warmup == "infonce":
        expected = infonce_loss(batch, scale).loss
    else:  # no warm-up: plain MH throughout
        expected = mh.loss
    assert torch.equal(start.loss, expected)
    assert start.loss.item() != pytest.approx(mh.loss.item()) or warmup == "none"


def smooth_mh_reference(img, txt, groups, margin, tau):
    """tau * log(1 + sum_j exp((m + s_j - s_p) / tau)) per anchor and direction, one negative at a
    time."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        pos = float(img[i] @ txt[i])
        for sims in ([float(img[i] @ txt[j]) for j in range(n)],
                     [float(img[j] @ txt[i]) for j in range(n)]):
            z = [(margin + sims[j] - pos) / tau for j in range(n) if groups[j] != groups[i]]
            m = max([0.0] + z)
            total += tau * (m + math.log(math.exp(-m) + sum(math.exp(x - m) for x in z)))
    return total / n


@pytest.mark.parametrize("tau", [0.02, 0.1, 1.0])
def test_smooth_mh_matches_loop_reference(tau):
    img, txt = _emb(10, 6, 31), _emb(10, 6, 32)
    groups = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5, 6, 7])
    out = smooth_mh_loss(local_batch(img, txt, groups), margin=0.2, tau=tau)
    ref = smooth_mh_reference(img, txt, groups.tolist(), 0.2, tau)
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)


def test_smooth_mh_limits_are_mh_and_margin_infonce():
    img, txt = _emb(12, 8, 33), _emb(12, 8, 34)
    groups = torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    batch = local_batch(img, txt, groups)
    mh = vse_loss(batch, margin=0.2, hardest=True).loss
    assert torch.equal(smooth_mh_loss(batch, margin=0.2, tau=0.0).loss, mh)  # tau 0: exactly MH
    # tau -> 0: the soft maximum tends to the hardest hinge (error <= tau * log(N + 1) per term)
    gaps = [abs(smooth_mh_loss(batch, margin=0.2, tau=t).loss.item() - mh.item())
            for t in (0.1, 0.01, 0.001)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] <= 2 * 0.001 * math.log(13)
    # margin 0, tau = 1/t: tau x (sum of both directions' InfoNCE) = 2 tau x symmetric InfoNCE
    scale = 1 / 0.07
    ref = infonce_reference(img, txt, groups.tolist(), scale)
    got = smooth_mh_loss(batch, margin=0.0, tau=1 / scale).loss.item()
    assert got == pytest.approx(2 * ref / scale, rel=1e-10)


def test_soft_handover_anneals_tau_to_exactly_mh():
    img, txt = _emb(10, 6, 35), _emb(10, 6, 36)
    batch = local_batch(img, txt)
    for weight, tau in ((0.0, 0.05), (0.5, 0.025), (0.9, 0.005)):
        got = vse_mh_handover_loss(batch, warmup="soft", weight=weight, margin=0.2, tau=0.05)
        assert got.loss.item() == pytest.approx(
            smooth_mh_loss(batch, margin=0.2, tau=tau).loss.item(), rel=1e-12)
    done = vse_mh_handover_loss(batch, warmup="soft", weight=1.0, margin=0.2, tau=0.05)
    assert torch.equal(done.loss, vse_loss(batch, margin=0.2, hardest=True).loss)


def test_handover_bad_warmup_and_missing_scale():
    batch = local_batch(_emb(4, 3, 0), _emb(4, 3, 1))
    with pytest.raises(ValueError, match="choose one of"):
        vse_mh_handover_loss(batch, warmup="softmax", weight=0.5)
    with pytest.raises(ValueError, match="logit_scale"):
        vse_mh_handover_loss(batch, warmup="infonce", weight=0.5)


def test_objective_hands_over_along_training_progress():
    from raycmr.train.dual_encoder.objective import CrossModalObjective

    cfg = load_config(None, [
        "data.kind=features", "model.image.kind=mlp", "model.text.kind=mlp",
        "model.image.input_dim=6", "model.text.input_dim=5", "model.embed_dim=8",
        "loss.kind=vse_mh", "loss.mh_warmup.loss=vse_sh", "loss.mh_warmup.start=0.2",
        "loss.mh_warmup.end=0.6"])
    torch.manual_seed(0)
    model = CrossModalObjective(cfg).double()
    batch = {"image_feat": torch.randn(10, 6, dtype=torch.float64),
             "text_feat": torch.randn(10, 5, dtype=torch.float64), "group": torch.arange(10)}
    img, txt = model.encoder(batch)
    pairs = local_batch(img, txt, batch["group"])
    sh = vse_loss(pairs, margin=0.2, hardest=False).loss
    mh = vse_loss(pairs, margin=0.2, hardest=True).loss
    for progress, w in ((0.1, 0.0), (0.4, 0.5), (0.6, 1.0), (1.0, 1.0)):
        got = model(batch, progress=progress)["contrastive"]
        assert got.item() == pytest.approx(((1 - w) * sh + w * mh).item(), rel=1e-12)


def test_config_rejects_a_backwards_window():
    with pytest.raises(ConfigError, match="start <= end"):
        load_config(None, ["loss.mh_warmup.start=0.5", "loss.mh_warmup.end=0.2"])
    with pytest.raises(ConfigError, match="mh_warmup.loss"):
        load_config(None, ["loss.mh_warmup.loss=hinge"])


def test_infonce_logit_scale_is_clamped_at_ln_100():
    """Steps that push the scale up (positives are the most similar pairs: a larger scale lowers
    InfoNCE) take the parameter past ln 100, yet the loss never scales logits by more than 100:
    it equals the loop reference at exactly 100, and no gradient pushes the scale further."""
    img = _emb(8, 16, 21)
    txt = torch.nn.functional.normalize(img + 1.5 * _emb(8, 16, 22), dim=1)
    logit_scale = torch.nn.Parameter(torch.tensor([math.log(20.0)], dtype=torch.float64))
    opt = torch.optim.Adam([logit_scale], lr=0.5)  # ~0.5 per step, whatever the gradient
    before = logit_scale.item()
    for _ in range(10):
        loss = infonce_loss(local_batch(img, txt), logit_scale).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < MAX_LOGIT_SCALE < logit_scale.item()  # pushed up, past the bound
    out = infonce_loss(local_batch(img, txt), logit_scale)
    out.loss.backward()
    ref = infonce_reference(img, txt, list(range(8)), 100.0)
    assert out.loss.item() == pytest.approx(ref, rel=1e-12)
    assert out.loss.item() != pytest.approx(
        infonce_reference(img, txt, list(range(8)), math.exp(logit_scale.item())), rel=1e-6)
    assert logit_scale.grad.abs().item() == 0.0
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100.0))


HANDOVER = ["loss.kind=vse_mh", "loss.mh_warmup.loss=infonce", "loss.mh_warmup.end=0.6"]


def _handover_worker(rank, world, port, splits, result_path):
    import os

    import torch.distributed as dist

    from tests.test_gather_equivalence import OVERRIDES, _batch, _model

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(load_config(None, OVERRIDES + HANDOVER))
        batch = _batch(sum(splits))
        start = sum(splits[:rank])
        out = model({k: v[start:start + splits[rank]] for k, v in batch.items()}, progress=0.3)
        out["loss"].backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        for g in grads.values():  # what DeepSpeed does: average over workers
            dist.all_reduce(g)
            g /= world
        loss = out["loss"].detach()
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads}, result_path)
    finally:
        dist.destroy_process_group()
    end_spawned_process()


def test_handover_over_two_workers_equals_single_process(tmp_path):
    """Mid hand-over (InfoNCE and MH both weighted), 2 gloo workers x 5 rows with the global
    batch == 1 process x 10 rows: loss and averaged gradients, logit scale included."""
    import torch.multiprocessing as mp
    from conftest import free_port

    from tests.test_gather_equivalence import OVERRIDES, _batch, _model

    model = _model(load_config(None, OVERRIDES + HANDOVER))
    out = model(_batch(10), progress=0.3)
    out["loss"].backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    path = str(tmp_path / "handover.pt")
    mp.start_processes(_handover_worker, args=(2, free_port(), (5, 5), path), nprocs=2,
                       join=True, start_method="spawn")
    multi = torch.load(path)
    assert multi["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-9)
    assert "encoder.logit_scale" in single  # the InfoNCE part is live at progress 0.3
    for name, g in single.items():
        assert torch.allclose(multi["grads"][name], g, atol=1e-9, rtol=0), name
