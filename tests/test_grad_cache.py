"""GradCache (``train.embed_chunk``, :mod:`raycmr.train.grad_cache`): the chunked step equals the
unchunked one.

- float64, plain torch: the parameter gradients and the parameters after one AdamW step of the
  chunked step equal the unchunked step's (1e-12 relative), for chunks that divide the batch
  and chunks that do not, in one process and on 2 real gloo ranks (uneven rows) with
  ``loss.anchors`` global and local (there the worker-averaged steps, as in
  ``tests/test_gather_equivalence.py``, which shows that equal to one process on the
  concatenated batch). The objective has loss-own parameters (the GRL
  discriminator, DSCMR's classifier), which get their gradient from the loss's backward.
- With dropout the chunked step equals encoding the same chunks with graph under the same
  random state: each chunk's masks are replayed.
- float32, the real DeepSpeed engine on the same 2 gloo ranks (ZeRO 0 and 1, gradient
  accumulation 1 and 2, the loop's forward / task backward / ``engine.step()``): gradients and the parameters after three steps
  equal the unchunked run's, with the same collectives (one gather, DeepSpeed's gradient
  reduction once per step however many chunks).
"""

import pytest
import torch
import torch.distributed as dist
from conftest import on_gloo_ranks
from test_engine_distributed import _count

from raycmr.config import ConfigError, load_config
from raycmr.train.dual_encoder.objective import CrossModalObjective
from raycmr.train.grad_cache import (
    backward_through_chunks,
    embed_without_graph,
    refuse_batch_statistics,
    row_chunks,
)

OVERRIDES = [
    "data.kind=features", "model.image.kind=mlp", "model.image.input_dim=6",
    "model.image.hidden_dims=[16]", "model.text.kind=mlp", "model.text.input_dim=5",
    "model.text.hidden_dims=[16]", "model.embed_dim=8", "loss.margin=0.3", "loss.kind=vse_mh",
    "loss.grl.enabled=true", "loss.dscmr.enabled=true", "model.num_classes=3",
    "train.batch_size=7",
]
CHUNKS = (1, 3, 4, 7)  # 7 rows: chunks of 3 and 4 leave a short last chunk
ANCHORS = ("global", "local")
KINDS = ("vse_mh", "infonce")  # InfoNCE: its learnable temperature is a loss parameter too
SPLIT = (7, 5)  # rows on rank 0 and rank 1
TOL64 = {"rtol": 1e-12, "atol": 1e-14}
#: the real engine's runs: float32 (DeepSpeed reduces no float64 gradients), InfoNCE (a learnable
#: temperature), (ZeRO stage, loss.anchors, train.grad_accum) of each setup, unchunked (None) and
#: two chunk sizes
ENGINE_OVERRIDES = ["train.precision=fp32", "loss.kind=infonce", "train.warmup_steps=1"]
ENGINE_SETUPS = [(0, "global", 1), (0, "local", 1), (1, "local", 1), (0, "local", 2)]
ENGINE_CHUNKS = (None, 3, 7)
#: float32: the chunks add their gradients in another order than one pass, so the last bits
#: differ; a lost or doubled chunk, or a mask not replayed, would not
TOL32 = {"rtol": 2e-5, "atol": 1e-6}
GRL_LAMBDA = 0.7


def _cfg(*extra):
    return load_config(None, OVERRIDES + list(extra))


def _batch(n: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"image_feat": torch.randn(n, 6, generator=g, dtype=dtype),
            "text_feat": torch.randn(n, 5, generator=g, dtype=dtype),
            "group": torch.tensor([0, 1, 2, 3, 3, 5, 6, 7, 8, 9, 10, 11][:n]),
            "label": torch.randint(0, 3, (n,), generator=g)}


def _model(cfg):
    torch.manual_seed(1)
    return CrossModalObjective(cfg).double()


def _unchunked(model, batch):
    return model(batch, grl_lambda=GRL_LAMBDA, progress=0.5)["loss"]


def _chunked(model, batch, chunk):
    """The GradCache step with plain torch's backward; returns the loss (detached)."""
    cached = embed_without_graph(model.encoder, batch, int(batch["group"].shape[0]), chunk,
                                 torch.device("cpu"))
    loss = model.losses(*cached.leaves, batch, grl_lambda=GRL_LAMBDA, progress=0.5)["loss"]
    backward_through_chunks(model.encoder, loss, cached, lambda t, last: t.backward())
    return loss.detach()


def _step(model, run, average=False):
    """One step: ``run()`` does the forward and backward; gradients (averaged over ranks when
    ``average``, as DeepSpeed does), then one AdamW step. Returns (loss, grads, params)."""
    model.zero_grad()
    loss = run()
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if average:
        for n, p in model.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
                grads[n] = p.grad.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=0.05).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, params


def _assert_same_step(got, want, tol):
    loss, grads, params = got
    torch.testing.assert_close(loss, want[0], **tol)
    assert set(grads) == set(want[1])
    # the loss's own parameters are among them (the GRL discriminator, DSCMR's classifier)
    assert "encoder.classifier.weight" in grads
    assert any(n.startswith("discriminator.") for n in grads)
    for name, g in want[1].items():
        torch.testing.assert_close(grads[name], g, **tol, msg=name)
    for name, p in want[2].items():
        torch.testing.assert_close(params[name], p, **tol, msg=name)
    assert max(g.abs().max() for g in want[1].values()) > 1e-3  # not trivially zero


def test_row_chunks_cover_the_rows_once():
    assert row_chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert row_chunks(6, 3) == [slice(0, 3), slice(3, 6)]
    assert row_chunks(2, 5) == [slice(0, 2)]
    assert row_chunks(0, 3) == []


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_step_equals_unchunked_in_one_process(chunk):
    cfg = _cfg()
    batch = _batch(7)
    model = _model(cfg)
    want = _step(model, lambda: _unchunked(model, batch))
    model = _model(cfg)
    got = _step(model, lambda: _chunked(model, batch, chunk))
    _assert_same_step(got, want, TOL64)


def test_dropout_masks_are_replayed_per_chunk():
    """With dropout the chunked step is the step of the same chunks encoded with graph (the
    same masks in the no-graph and the re-encoding pass), not of other masks."""
    cfg = _cfg("model.image.dropout=0.5", "model.text.dropout=0.5")
    batch, chunk = _batch(7), 3

    def reference():
        parts = [model.encoder({k: v[s] for k, v in batch.items()}) for s in row_chunks(7, chunk)]
        img, txt = (torch.cat(p) for p in zip(*parts))
        return model.losses(img, txt, batch, grl_lambda=GRL_LAMBDA, progress=0.5)["loss"]

    model = _model(cfg)
    torch.manual_seed(5)
    want = _step(model, reference)
    after_reference = torch.rand(1)
    model = _model(cfg)
    torch.manual_seed(5)
    got = _step(model, lambda: _chunked(model, batch, chunk))
    _assert_same_step(got, want, TOL64)
    # the random stream moves on as one pass over the chunks moves it, not twice
    torch.testing.assert_close(torch.rand(1), after_reference)
    # and the masks did matter: another seed gives another step
    model = _model(cfg)
    torch.manual_seed(6)
    other = _step(model, lambda: _chunked(model, batch, chunk))
    assert not torch.allclose(other[1]["encoder.image_proj.weight"],
                              want[1]["encoder.image_proj.weight"])


def _torch_steps(rank, world):
    """The float64 steps of this rank's rows, unchunked (None) and in each chunk size."""
    start = sum(SPLIT[:rank])
    mine = {k: v[start:start + SPLIT[rank]] for k, v in _batch(sum(SPLIT)).items()}
    results = {}
    for kind, anchors in ((k, a) for k in KINDS for a in ANCHORS):
        cfg = _cfg(f"loss.anchors={anchors}", f"loss.kind={kind}")
        for chunk in (None, *CHUNKS):
            model = _model(cfg)
            def run(model=model, chunk=chunk):
                return _unchunked(model, mine) if chunk is None else _chunked(model, mine, chunk)

            loss, grads, params = _step(model, run, average=True)
            dist.all_reduce(loss)
            results[(kind, anchors, chunk)] = (loss / world, grads, params)
    return results


def _engine_steps(rank):
    """Three real DeepSpeed optimizer steps of each setup (DeepSpeed's WarmupCosineLR gives the
    first two the learning rate 0): every micro-step's gradients after the backward
    (worker-averaged at the accumulation boundary), the parameters after the steps, and the
    last micro-step's collectives."""
    from deepspeed.utils import safe_get_full_grad

    from raycmr.train.loop import build_engine
    from raycmr.train.registry import make_task
    from raycmr.train.task import StepInfo

    g = torch.Generator().manual_seed(100 + rank)
    rows = SPLIT[rank]
    batch = {"image_feat": torch.randn(rows, 6, generator=g),
             "text_feat": torch.randn(rows, 5, generator=g),
             "group": torch.arange(rows) + 100 * rank,
             "label": torch.randint(0, 3, (rows,), generator=g)}
    results = {}
    for stage, anchors, accum in ENGINE_SETUPS:
        for chunk in ENGINE_CHUNKS:
            cfg = _cfg(*ENGINE_OVERRIDES, f"train.zero_stage={stage}", f"loss.anchors={anchors}",
                       f"train.grad_accum={accum}", f"train.embed_chunk={chunk or 0}")
            torch.manual_seed(0)
            task = make_task("dual_encoder", cfg)
            engine = build_engine(task, cfg, total_steps=10)
            got = {"init": _params(engine.module), "grads": []}

            def backward(engine=engine, task=task):
                out = task.forward(engine, batch, StepInfo(0, engine.global_steps, 10, 0))
                task.backward(engine, out)

            for _ in range(3 * accum):  # micro-steps of 3 optimizer steps
                calls = _count(backward)
                # the worker-averaged gradient (ZeRO 1: assembled from the partitions)
                got["grads"].append({n: safe_get_full_grad(p).detach().clone()
                                     for n, p in engine.module.named_parameters()
                                     if safe_get_full_grad(p) is not None})
                for who, made in _count(engine.step).items():
                    for name, n in made.items():
                        calls.setdefault(who, {})[name] = calls.get(who, {}).get(name, 0) + n
            got["calls"] = calls  # the last step's
            got["params"] = _params(engine.module)
            results[(stage, anchors, accum, chunk)] = got
    return results


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _worker(rank, world):
    return {"torch": _torch_steps(rank, world), "engine": _engine_steps(rank)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return on_gloo_ranks(_worker, 2, str(tmp_path_factory.mktemp("gradcache") / "results"))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_step_on_two_ranks_equals_unchunked(two_ranks, kind, anchors, chunk):
    """Each rank's rows (7 and 5) in chunks, the loss over the gathered batch: the
    worker-averaged step equals the unchunked one (which equals one process on the
    concatenated batch, tests/test_gather_equivalence.py)."""
    results = two_ranks[0]["torch"]
    _assert_same_step(results[(kind, anchors, chunk)], results[(kind, anchors, None)], TOL64)


@pytest.mark.parametrize("chunk", [c for c in ENGINE_CHUNKS if c])
@pytest.mark.parametrize("setup", ENGINE_SETUPS, ids=lambda s: "zero{}-{}-accum{}".format(*s))
def test_chunked_deepspeed_step_equals_unchunked(two_ranks, setup, chunk):
    """The loop's step with the real engine: the worker-averaged gradients of every step and
    the parameters after the steps equal the unchunked run's on every rank."""
    for rank, ranks in enumerate(two_ranks):
        whole = ranks["engine"][(*setup, None)]
        got = ranks["engine"][(*setup, chunk)]
        for step, want in enumerate(whole["grads"]):
            assert set(got["grads"][step]) == set(want)
            # the loss's own parameters: temperature, classifier, discriminator
            assert {"encoder.logit_scale", "encoder.classifier.weight"} <= set(want)
            for name, g in want.items():
                torch.testing.assert_close(got["grads"][step][name], g, **TOL32,
                                           msg=f"rank {rank} step {step} {name}")
        for name, p in whole["params"].items():
            torch.testing.assert_close(got["params"][name], p, **TOL32, msg=f"{rank} {name}")
            # every rank holds the same parameters after the step
            assert torch.equal(p, two_ranks[0]["engine"][(*setup, None)]["params"][name])
        assert max(float((p - whole["init"][n]).abs().max())
                   for n, p in whole["params"].items()) > 1e-4  # the steps moved them


@pytest.mark.parametrize("setup", ENGINE_SETUPS, ids=lambda s: "zero{}-{}-accum{}".format(*s))
def test_chunked_step_makes_the_same_collectives(two_ranks, setup):
    """One gather (+ its backward all-reduce under local anchors) and DeepSpeed's gradient
    reduction once per step, however many chunks: the backward passes before the last run
    under ``engine.no_sync()``."""
    for ranks in two_ranks:
        whole = ranks["engine"][(*setup, None)]["calls"]
        for chunk in ENGINE_CHUNKS[1:]:
            assert ranks["engine"][(*setup, chunk)]["calls"] == whole, (chunk, whole)
        backward = {"local": {"all_reduce": 1}, "global": {}}[setup[1]]
        assert whole["raycmr"] == {"all_gather": 1, **backward}
        assert whole["deepspeed"]


def test_batchnorm_towers_are_refused():
    with pytest.raises(ConfigError, match="train.embed_chunk with model.image"):
        _cfg("train.embed_chunk=3", "model.image.input_norm=batchnorm")
    model = CrossModalObjective(load_config(None, OVERRIDES + ["model.text.input_norm=batchnorm"]))
    with pytest.raises(ValueError, match="BatchNorm.*train.embed_chunk=0"):
        refuse_batch_statistics(model.encoder)


@pytest.mark.parametrize("overrides, message", [
    (["train.embed_chunk=-1"], ("train.embed_chunk is -1: set 0 .off. or a row count from 1 "
                                "to the per-worker batch train.batch_size=7")),
    (["train.embed_chunk=8"], "train.embed_chunk is 8: set 0"),
    (["train.embed_chunk=3", "train.zero_stage=2"],
     "ZeRO stage 2 .* set train.zero_stage to 0 or 1, or train.embed_chunk=0"),
    (["train.embed_chunk=3", "train.precision=fp16"], "fp16 .* use bf16 or fp32"),
    (["train.embed_chunk=3", "train.task=slow"], "train.task=slow has no such step"),
])
def test_bad_embed_chunk_stops_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(*overrides)
    assert "\n" not in str(info.value)


def test_transformer_towers_chunked_step_equals_unchunked():
    """ViT + BERT towers (``raycmr.configs.tiny``, 2 heads, padded captions; BERT's dropout
    off: chunks draw other masks than one pass): the chunked step is the unchunked one."""
    from raycmr.configs.tiny import TINY_TOWERS

    no_dropout = ("model.text.hf_config={model_type: bert, vocab_size: 30522, hidden_size: 32, "
                  "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
                  "max_position_embeddings: 32, hidden_dropout_prob: 0.0, "
                  "attention_probs_dropout_prob: 0.0}")
    cfg = load_config(None, [*TINY_TOWERS, no_dropout, "data.image_size=32", "data.max_text_len=12",
                             "model.embed_dim=8", "loss.kind=infonce", "train.batch_size=5"])
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(12) < torch.tensor([12, 7, 3, 12, 9])[:, None]).long()
    batch = {"pixel_values": torch.randn(5, 3, 32, 32, generator=g, dtype=torch.float64),
             "input_ids": torch.randint(0, 30522, (5, 12), generator=g) * mask,
             "attention_mask": mask, "group": torch.arange(5), "label": torch.zeros(5).long()}
    model = _model(cfg)
    want = _step(model, lambda: model(batch, progress=0.5)["loss"])
    model = _model(cfg)

    def chunked():
        cached = embed_without_graph(model.encoder, batch, 5, 2, torch.device("cpu"))
        loss = model.losses(*cached.leaves, batch, progress=0.5)["loss"]
        backward_through_chunks(model.encoder, loss, cached, lambda t, last: t.backward())
        return loss.detach()

    got = _step(model, chunked)
    torch.testing.assert_close(got[0], want[0], **TOL64)
    assert set(got[1]) == set(want[1]) and "encoder.logit_scale" in want[1]
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, **TOL64, msg=name)
    # (no parameter check after AdamW here: the attention key biases' gradient is zero in exact
    # arithmetic, softmax ignores them, and AdamW turns its rounding noise into +-lr steps)
