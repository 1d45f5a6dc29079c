"""DCKT transfer training: the objective on tensors, and a real 2-round, 2-worker DeepSpeed run
on a local Ray cluster from a tiny two-domain feature set written here."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from raycmr.config import load_config
from raycmr.data.schema import feature_shard_schema
from raycmr.data.transforms import stable_hash63
from raycmr.distributed import local_batch
from raycmr.losses.contrastive import vse_loss
from raycmr.losses.mmd import mmd2_unbiased, pairwise_constraint
from raycmr.losses.semantic import semantic_loss
from raycmr.models.dual_encoder import DualEncoder
from raycmr.train.dckt.objective import DCKTObjective, source_model_config
from raycmr.train.dckt.selection import pair_average_precision, selection_probabilities

IMG_DIM, TXT_DIM = 12, 6
OBJECTIVE_OVERRIDES = [
    "data.kind=features", "model.embed_dim=8", "model.shared_layers=1", "model.num_classes=2",
    f"model.image={{kind: mlp, input_dim: {IMG_DIM}, hidden_dims: [16]}}",
    f"model.text={{kind: mlp, input_dim: {TXT_DIM}, hidden_dims: [16]}}",
    "loss.kind=vse_mh", "loss.weight=0.7", "loss.margin=0.2",
    "dckt.mmd_weight=1.5", "dckt.pair_weight=0.3", "dckt.semantic_weight=0.9",
    "dckt.kernel_bandwidths=[0.5, 1.0, 2.0]",
]


def _batch(n: int, seed: int, classes: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_feat": torch.randn(n, IMG_DIM, generator=g) + shift,
        "text_feat": torch.randn(n, TXT_DIM, generator=g) + shift,
        "label": torch.randint(0, classes, (n,), generator=g),
        "group": torch.arange(n) + 1000 * seed,
    }


@pytest.fixture(scope="module")
def objective() -> DCKTObjective:
    torch.manual_seed(0)
    cfg = load_config(None, OBJECTIVE_OVERRIDES)
    return DCKTObjective(cfg, source_classes=3).eval()


def _reference_domain_loss(model: DualEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One domain's loss from a standalone DualEncoder and the loss functions themselves."""
    img, txt = model(batch)
    con = vse_loss(local_batch(img, txt, batch["group"]), margin=0.2, hardest=True).loss
    p_img = model.image_proj(model.image_tower(batch["image_feat"]))
    p_txt = model.text_proj(model.text_tower(batch["text_feat"]))
    sem = (semantic_loss(model.classifier(model.shared(p_img)), batch["label"])
           + semantic_loss(model.classifier(model.shared(p_txt)), batch["label"])) / 2
    pair = pairwise_constraint(F.normalize(p_img, dim=-1), F.normalize(p_txt, dim=-1))
    return 0.7 * con + 0.9 * sem + 0.3 * pair


def _standalone_source(objective: DCKTObjective) -> DualEncoder:
    cfg = objective.cfg
    model = DualEncoder(source_model_config(cfg.model, objective.source_classes)).eval()
    model.load_state_dict(objective.source_state_dict())
    return model


def test_without_mmd_the_loss_is_the_sum_of_the_domain_losses(objective) -> None:
    src, tgt = _batch(10, 1, classes=3), _batch(7, 2, classes=2)
    with torch.no_grad():
        out = objective(src, tgt, mmd_weight=0.0)
        expected = (_reference_domain_loss(_standalone_source(objective), src)
                    + _reference_domain_loss(objective.encoder, tgt))
    assert torch.isclose(out["loss"], expected, rtol=1e-5, atol=1e-6)
    # the MMD parts are still computed (and logged), just not added
    assert float(out["mmd_media"]) != 0.0 and float(out["mmd_corr"]) != 0.0
    for key in ("src_contrastive", "tgt_contrastive", "src_semantic", "tgt_semantic",
                "src_pair", "tgt_pair"):
        assert torch.isfinite(out[key]), key


def test_mmd_weight_adds_the_media_and_correlation_mmd(objective) -> None:
    src, tgt = _batch(10, 3, classes=3), _batch(9, 4, classes=2, shift=1.0)
    with torch.no_grad():
        base = objective(src, tgt, mmd_weight=0.0)
        full = objective(src, tgt)  # dckt.mmd_weight = 1.5
    expected = base["loss"] + 1.5 * (full["mmd_media"] + full["mmd_corr"])
    assert torch.isclose(full["loss"], expected, rtol=1e-5, atol=1e-6)
    # the correlation level is the MMD of the common representations, per modality; the media
    # level that of the L2-normalised tower and projection outputs, per modality
    bw = [0.5, 1.0, 2.0]
    src_model = _standalone_source(objective)

    def media_layers(model: DualEncoder, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        f_img, f_txt = model.image_tower(batch["image_feat"]), model.text_tower(batch["text_feat"])
        return [F.normalize(x, dim=-1)
                for x in (f_img, model.image_proj(f_img), f_txt, model.text_proj(f_txt))]

    with torch.no_grad():
        s_img, s_txt = src_model(src)
        t_img, t_txt = objective.encoder(tgt)
        ref = mmd2_unbiased(s_img, t_img, bw) + mmd2_unbiased(s_txt, t_txt, bw)
        media_ref = sum(mmd2_unbiased(a, b, bw) for a, b in zip(
            media_layers(src_model, src), media_layers(objective.encoder, tgt), strict=True))
    assert torch.isclose(full["mmd_corr"], ref, rtol=1e-5, atol=1e-6)
    assert torch.isclose(full["mmd_media"], media_ref, rtol=1e-5, atol=1e-6)


def test_mmd_parts_detect_a_mean_shift_between_domains(objective) -> None:
    # identical branches: the MMD then only sees the data distributions
    twin = DCKTObjective(objective.cfg, source_classes=2).eval()
    twin.source.load_state_dict({k: v for k, v in twin.encoder.state_dict().items()
                                 if not k.startswith("shared.")})
    src = _batch(64, 5, classes=2)
    same = _batch(64, 6, classes=2)
    shifted = _batch(64, 6, classes=2, shift=2.0)
    with torch.no_grad():
        out_same, out_shift = twin(src, same), twin(src, shifted)
    for key in ("mmd_media", "mmd_corr"):
        assert float(out_shift[key]) > 0.05, key
        assert float(out_shift[key]) > 10 * abs(float(out_same[key])), key
    assert float(out_shift["loss"]) > float(out_same["loss"])


def test_mmd_gradient_reaches_both_branches(objective) -> None:
    model = DCKTObjective(objective.cfg, source_classes=3)
    src, tgt = _batch(16, 7, classes=3), _batch(16, 8, classes=2, shift=1.0)
    out = model(src, tgt)
    mmd = out["mmd_media"]  # detached: recompute the graph part
    assert mmd.requires_grad is False
    loss_no_mmd = model(src, tgt, mmd_weight=0.0)["loss"]
    diff = out["loss"] - loss_no_mmd
    diff.backward()
    for branch in (model.source, model.encoder):
        grad = branch.image_tower.net[0].weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0


# ------------------------------------------------------------------------- a real Ray run

N_SOURCE, N_TARGET, BATCH = 96, 48, 16
ALPHA = 0.8


def _pairs(rng: np.random.Generator, n: int, classes: int, shift: float, prefix: str,
           domain: str) -> list[dict]:
    img_means = rng.normal(size=(classes, IMG_DIM)) * 2.0
    txt_means = rng.normal(size=(classes, TXT_DIM)) * 2.0
    labels = np.arange(n) % classes
    rows = []
    for i, c in enumerate(labels):
        rows.append({
            "id": f"{prefix}-{i}",
            "image_feat": (img_means[c] + rng.normal(size=IMG_DIM) + shift).astype(np.float32),
            "text_feat": (txt_means[c] + rng.normal(size=TXT_DIM) + shift).astype(np.float32),
            "label": int(c), "domain": domain,
        })
    return rows


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """data.train holds both domains (``domain`` column): a source of 3 classes and a shifted
    target with its own 2 classes. No validation split (each one costs a Ray Data execution per
    round; the no-val path is exercised instead)."""
    root = tmp_path_factory.mktemp("dckt")
    rng = np.random.default_rng(11)
    schema = feature_shard_schema(("label", "domain"))
    source = _pairs(rng, N_SOURCE, 3, 0.0, "s", "source")
    target = _pairs(rng, N_TARGET, 2, 0.7, "t", "target")
    (root / "train").mkdir()
    rows = source + target
    order = rng.permutation(len(rows))
    mixed = [rows[i] for i in order]
    for k in range(2):
        part = mixed[k * len(mixed) // 2:(k + 1) * len(mixed) // 2]
        pq.write_table(pa.Table.from_pylist(part, schema=schema),
                       root / "train" / f"part-{k}.parquet")
    return root, target


def _run_config(root, storage):
    return load_config(None, [
        f"data.train=[{root}/train]", "data.kind=features",
        "data.shuffle_buffer=32",
        "model.embed_dim=8", "model.shared_layers=1",
        f"model.image={{kind: mlp, input_dim: {IMG_DIM}, hidden_dims: [16]}}",
        f"model.text={{kind: mlp, input_dim: {TXT_DIM}, hidden_dims: [16]}}",
        "loss.kind=vse_mh", "loss.weight=0.5",
        "train.task=dckt", "dckt.rounds=2", "dckt.epochs_per_round=1", f"dckt.alpha={ALPHA}",
        "train.num_workers=2", f"train.batch_size={BATCH}", "train.epochs=1",
        "train.lr=0.01", "train.warmup_steps=1", "train.log_every=100", "train.zero_stage=1",
        "train.max_failures=0", "train.torch_threads=1", f"train.storage_path={storage}",
    ])


@pytest.mark.ray
def test_two_round_dckt_run(ray_cluster, two_domains, tmp_path) -> None:
    from raycmr.train.dckt.rounds import load_source_model
    from raycmr.train.run import train

    root, target_rows = two_domains
    result = train(_run_config(root, tmp_path / "runs"))
    assert result.error is None
    assert [r.round for r in result.rounds] == [0, 1, 2]
    per_epoch = N_SOURCE // 2 // BATCH  # 3 optimizer steps per source pass

    # every loss part is reported and finite; the MMD links are off in round 0 only
    for record in result.rounds:
        m = record.metrics
        for key in ("train_loss", "train_mmd_media", "train_mmd_corr", "train_src_pair",
                    "train_tgt_pair", "train_src_semantic", "train_tgt_semantic",
                    "train_src_contrastive", "train_tgt_contrastive"):
            assert key in m and math.isfinite(m[key]), (record.round, key)
        assert m["train_mmd_weight"] == (0.0 if record.round == 0 else 1.0)
    assert result.rounds[0].metrics["target_pairs"] == N_TARGET

    # the global step and epoch continue across rounds: round k ends at step 3 (k + 1)
    steps = [[h["step"] for h in r.history] for r in result.rounds]
    assert steps == [[per_epoch], [2 * per_epoch], [3 * per_epoch]]
    assert [[h["epoch"] for h in r.history] for r in result.rounds] == [[1], [2], [3]]
    assert result.rounds[2].history[0]["step"] == result.rounds[1].history[-1]["step"] + per_epoch

    # round 1's selection, recomputed here from the round-0 checkpoint's source model
    sel = result.rounds[1].selection
    model, cfg = load_source_model(result.rounds[0].checkpoint_path)
    assert cfg.dckt.source_classes == 3 and cfg.model.num_classes == 2
    keys = np.array([stable_hash63(r["id"]) for r in target_rows], dtype=np.int64)
    order = np.argsort(keys)
    feats = {"image_feat": torch.tensor(np.stack([r["image_feat"] for r in target_rows])[order]),
             "text_feat": torch.tensor(np.stack([r["text_feat"] for r in target_rows])[order])}
    labels = np.array([r["label"] for r in target_rows])[order]
    with torch.no_grad():
        img, txt = model(feats)
    np.testing.assert_array_equal(sel.pair_key, keys[order])
    ap = pair_average_precision(img.numpy(), txt.numpy(), labels)
    # The actors embed in other batch shapes than this one forward pass: float rounding may swap
    # two near-tied similarities, which moves that pair's AP; every other pair agrees to 1e-6.
    close = np.abs(sel.ap - ap) <= 1e-6
    assert close.mean() >= 0.9, np.abs(sel.ap - ap).max()
    np.testing.assert_allclose(sel.prob, selection_probabilities(sel.ap, 1, ALPHA), rtol=0,
                               atol=1e-12)
    probs = sel.prob
    assert probs.min() < ALPHA - 0.05  # the selection is not trivially uniform in round 1
    # a Bernoulli draw per pair: the count is near sum(probs)
    sd = math.sqrt(float((probs * (1 - probs)).sum()))
    assert abs(sel.count - probs.sum()) <= 4 * sd + sel.topped_up + 1
    assert result.rounds[1].metrics["target_pairs"] == sel.count
    # round 2 draws with iter = 2: probabilities are no further from uniform than round 1's
    sel2 = result.rounds[2].selection
    assert sel2.prob.min() >= 0 and sel2.prob.max() <= ALPHA
    np.testing.assert_allclose(sel2.prob, selection_probabilities(sel2.ap, 2, ALPHA))
    saved = pq.read_table(f"{result.path}/selection_round1.parquet").to_pydict()
    np.testing.assert_array_equal(saved["selected"], sel.selected)

    # the exported target model is a plain DualEncoder with the target classifier
    from raycmr.artifacts import load_exported

    target_model, _ = load_exported(result.rounds[2].checkpoint_path)
    assert target_model.classifier.out_features == 2
    assert dataclasses.asdict(cfg.model)["embed_dim"] == 8
