"""The training engine on 2 real gloo processes with a real DeepSpeed engine: the collectives of
one training step are counted (the one packed gather of the global batch plus DeepSpeed's
gradient all-reduce, nothing else), and sharded validation gives exactly the metrics of
embedding the whole validation set in one process."""

import traceback

import pytest
import torch
import torch.distributed as dist
from conftest import on_gloo_ranks

from raycmr.config import load_config

OVERRIDES = [
    "data.kind=features", "model.image.kind=mlp", "model.image.input_dim=6",
    "model.image.hidden_dims=[16]", "model.text.kind=mlp", "model.text.input_dim=5",
    "model.text.hidden_dims=[16]", "model.embed_dim=8", "train.batch_size=8",
    "train.warmup_steps=1", "train.zero_stage=0", "train.precision=fp32",
]
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce",
               "all_reduce_coalesced", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "gather",
               "gather_object", "scatter", "_all_gather_base", "_reduce_scatter_base")
VAL_ROWS, VAL_BATCH = 19, 4  # 5 batches, the last short: rank 0 embeds 3, rank 1 2 (+1 pad)


def _val_batches(cfg):
    g = torch.Generator().manual_seed(5)
    out = []
    for start in range(0, VAL_ROWS, VAL_BATCH):
        n = min(VAL_BATCH, VAL_ROWS - start)
        out.append({
            "image_feat": torch.randn(n, 6, generator=g), "text_feat": torch.randn(n, 5, generator=g),
            "group": torch.arange(start, start + n) // 2,  # two captions per image
            "label": (torch.arange(start, start + n) // 2) % 3,
        })
    return out


def _train_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    rows = 8 - rank  # uneven: a bad row dropped on rank 1
    return {"image_feat": torch.randn(rows, 6, generator=g),
            "text_feat": torch.randn(rows, 5, generator=g),
            "group": torch.arange(rows) + 100 * rank, "label": torch.zeros(rows, dtype=torch.long)}


def _count(fn):
    """``{caller: {collective: calls}}`` made by ``fn()``; the caller is whichever of raycmr's
    code and DeepSpeed's runtime (not its comm wrapper) is nearest the call on the stack."""
    originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
    calls: dict[str, dict[str, int]] = {}

    def wrap(name, original):
        def counted(*a, **kw):
            who = next(("deepspeed" if "deepspeed/runtime" in f.filename else "raycmr"
                        for f in reversed(traceback.extract_stack())
                        if "deepspeed/runtime" in f.filename or "/raycmr/" in f.filename),
                       "other")
            calls.setdefault(who, {})[name] = calls.setdefault(who, {}).get(name, 0) + 1
            return original(*a, **kw)
        return counted

    try:
        for n, original in originals.items():
            setattr(dist, n, wrap(n, original))
        fn()
    finally:
        for n, original in originals.items():
            setattr(dist, n, original)
    return calls


def _worker(rank, world):
    from raycmr import distributed
    from raycmr.train.loop import build_engine, train_step
    from raycmr.train.registry import make_task
    from raycmr.train.task import StepInfo

    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    task = make_task("dual_encoder", cfg)
    engine = build_engine(task, cfg, total_steps=10)
    batch = _train_batch(rank)
    info = StepInfo(0, 0, 10, 0)
    train_step(engine, task, batch, info)  # warm-up: first-call paths
    step_calls = _count(lambda: train_step(engine, task, batch, info))

    forwards = [0]
    module = engine.module
    original = module.encoder.retrieval_embed

    def counting_embed(b):
        forwards[0] += 1
        return original(b)

    module.encoder.retrieval_embed = counting_embed
    engine.eval()
    with torch.no_grad():
        metrics = task.validate(module, lambda fn: distributed.sharded_map(
            _val_batches(cfg), fn, equal_calls=True))
    module.encoder.retrieval_embed = original
    state = {k: v.detach().clone() for k, v in module.encoder.state_dict().items()}
    return {"calls": step_calls, "metrics": metrics, "forwards": forwards[0], "state": state}




@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return on_gloo_ranks(_worker, 2, str(tmp_path_factory.mktemp("engine") / "result"))


def test_one_training_step_makes_one_gather_and_deepspeeds_gradient_all_reduce(two_ranks):
    for result in two_ranks:
        # ours: the packed gather of embeddings + groups + sizes; no size exchange, no backward
        # all-reduce, no per-step agreement or sample counter. DeepSpeed's: the gradient
        # all-reduce (one fp32 bucket) and the gradient norm of train.grad_clip
        assert result["calls"] == {"raycmr": {"all_gather": 1},
                                   "deepspeed": {"all_reduce": 2}}, result["calls"]


def test_sharded_validation_equals_one_process_on_the_whole_set(two_ranks):
    from raycmr.evaluate.embedding import embed_batches
    from raycmr.evaluate.summary import evaluate_embeddings
    from raycmr.models.dual_encoder import DualEncoder

    cfg = load_config(None, OVERRIDES)
    encoder = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
    encoder.load_state_dict(two_ranks[0]["state"])
    encoder.eval()
    reference = evaluate_embeddings(embed_batches(encoder, _val_batches(cfg)))
    expected = {f"val_{k}": v for k, v in reference.items()}
    assert two_ranks[0]["metrics"] == expected  # exact, every metric
    assert expected["val_num_images"] == 10 and expected["val_num_captions"] == VAL_ROWS
    assert two_ranks[1]["metrics"] == {}  # metrics are computed on rank 0
    # rank 1 ran one padding forward: both ranks made the same number of forwards (ZeRO-3)
    assert two_ranks[0]["forwards"] == two_ranks[1]["forwards"] == 3
