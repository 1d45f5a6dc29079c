"""W workers x batch B == 1 worker x the concatenated batch: the loss and the (worker-averaged)
parameter gradients of real gloo runs (2 and 3 processes, uneven and empty batches) equal the
single-process run on the concatenated batch, with ``loss.anchors=global`` (every rank scores
N x N) and ``loss.anchors=local`` (own anchors x all N candidates, a backward all-reduce).

Equal means equal up to float64 rounding (1e-12 relative): the ranks add the anchors' terms in
another order than one process does, so the last bits may differ; any real difference (a
missing negative, a wrong scale, a lost gradient) is orders of magnitude larger."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from raycmr.config import load_config
from raycmr.distributed import end_spawned_process
from raycmr.losses.batch import global_batch, local_batch
from raycmr.losses.contrastive import infonce_loss, vse_loss
from raycmr.train.dual_encoder.objective import CrossModalObjective

OVERRIDES = [
    "data.kind=features", "model.image.kind=mlp", "model.image.input_dim=6",
    "model.image.hidden_dims=[16]", "model.text.kind=mlp", "model.text.input_dim=5",
    "model.text.hidden_dims=[16]", "model.embed_dim=8", "loss.margin=0.3",
]
#: loss.kind plus overrides; "soft" is MH's smoothed hand-over half-way (progress 0.5)
KINDS = {
    "vse_mh": ["loss.kind=vse_mh"],
    "vse_sh": ["loss.kind=vse_sh"],
    "infonce": ["loss.kind=infonce"],
    "soft": ["loss.kind=vse_mh", "loss.mh_warmup.loss=soft", "loss.mh_warmup.end=1.0",
             "loss.mh_warmup.tau=0.2"],
}
ANCHORS = ("global", "local")
#: rows of each rank: 2 ranks uneven; 3 ranks uneven; 3 ranks with an empty last batch
SPLITS = [(6, 4), (4, 4, 2), (5, 5, 0)]
TOL = {"rtol": 1e-12, "atol": 1e-14}


def _cfg(kind: str, anchors: str = "global", global_negatives: bool = True):
    return load_config(None, OVERRIDES + KINDS[kind] + [
        f"loss.anchors={anchors}", f"loss.global_negatives={global_negatives}"])


def _batch(n: int):
    g = torch.Generator().manual_seed(0)
    return {
        "image_feat": torch.randn(n, 6, generator=g, dtype=torch.float64),
        "text_feat": torch.randn(n, 5, generator=g, dtype=torch.float64),
        # two rows share group 3 (two captions of one image): never negatives of each other
        "group": torch.tensor([0, 1, 2, 3, 3, 5, 6, 7, 8, 9][:n]),
        "label": torch.zeros(n, dtype=torch.long),
    }


def _model(cfg):
    torch.manual_seed(1)
    return CrossModalObjective(cfg).double()


def _loss_and_grads(model, batch):
    out = model(batch, progress=0.5)
    model.zero_grad()
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def _embeddings(n: int, k: int = 2, d: int = 4):
    """Unit-norm image, caption and ``k`` extra captions per pair, float64."""
    g = torch.Generator().manual_seed(3)
    unit = [torch.nn.functional.normalize(torch.randn(*s, d, generator=g, dtype=torch.float64),
                                          dim=-1) for s in ((n,), (n,), (n, k))]
    return unit


def _embedding_losses(img, txt, extra, groups, anchors, pad_rows):
    """MH, SH and InfoNCE with the extra captions; the sum, for one backward."""
    batch = global_batch(img, txt, groups, pad_rows, anchors, extra_txt=extra) if anchors \
        else local_batch(img, txt, groups, extra)
    scale = torch.tensor(2.0, dtype=torch.float64)
    return (vse_loss(batch, margin=0.3).loss + vse_loss(batch, margin=0.3, hardest=False).loss
            + infonce_loss(batch, scale).loss)


def _worker(rank, world, port, splits, result_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = sum(splits)
        start = sum(splits[:rank])
        mine = slice(start, start + splits[rank])
        batch = _batch(n)
        local = {k: v[mine] for k, v in batch.items()}
        results = {}
        runs = [(kind, anchors, True) for kind in KINDS for anchors in ANCHORS]
        if 0 not in splits:  # a worker alone with an empty batch has no loss to compute
            runs.append(("vse_mh", "global", False))
        for kind, anchors, global_negatives in runs:
            loss, grads = _loss_and_grads(_model(_cfg(kind, anchors, global_negatives)), local)
            # what DDP / DeepSpeed do to gradients: average over workers
            for g in grads.values():
                dist.all_reduce(g)
                g /= world
            dist.all_reduce(loss)
            results[(kind, anchors, global_negatives)] = {"loss": loss / world, "grads": grads}
        # embedding level, with extra caption candidates: rank r's rows get W dL/d(rows)
        img, txt, extra = (t[mine].clone().requires_grad_() for t in _embeddings(n))
        for anchors in ANCHORS:
            loss = _embedding_losses(img, txt, extra, batch["group"][mine], anchors, max(splits))
            loss.backward()
            parts = [torch.zeros(0)] * world
            rows = [torch.cat([t.grad.flatten(1) for t in (img, txt, extra)], 1)
                    / world]
            dist.all_gather_object(parts, rows[0])
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[("embeddings", anchors)] = {"loss": total / world, "grad": torch.cat(parts)}
            for t in (img, txt, extra):
                t.grad = None
        if rank == 0:
            torch.save(results, result_path)
    finally:
        dist.destroy_process_group()
    end_spawned_process()


@pytest.fixture(scope="module", params=SPLITS, ids=lambda s: "x".join(map(str, s)))
def run(request, tmp_path_factory):
    splits = request.param
    path = str(tmp_path_factory.mktemp("gather") / "results.pt")
    mp.start_processes(_worker, args=(len(splits), free_port(), splits, path),
                       nprocs=len(splits), join=True, start_method="spawn")
    return splits, torch.load(path)


@pytest.mark.parametrize("anchors", ANCHORS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_workers_equal_single_process(run, kind, anchors):
    splits, results = run
    single_loss, single_grads = _loss_and_grads(_model(_cfg(kind)), _batch(sum(splits)))
    multi = results[(kind, anchors, True)]
    torch.testing.assert_close(multi["loss"], single_loss, **TOL)
    assert set(multi["grads"]) == set(single_grads)
    for name, g in single_grads.items():
        torch.testing.assert_close(multi["grads"][name], g, **TOL, msg=name)
    assert max(g.abs().max() for g in single_grads.values()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("anchors", ANCHORS)
def test_extra_captions_through_the_gather_equal_single_process(run, anchors):
    """Extra caption candidates (k per pair) gathered with the rows: loss and every row's
    gradient (image, caption, extra captions) equal one process on the whole batch."""
    splits, results = run
    n = sum(splits)
    img, txt, extra = (t.clone().requires_grad_() for t in _embeddings(n))
    loss = _embedding_losses(img, txt, extra, _batch(n)["group"], None, n)
    loss.backward()
    want = torch.cat([t.grad.flatten(1) for t in (img, txt, extra)], 1)
    got = results[("embeddings", anchors)]
    torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
    torch.testing.assert_close(got["grad"], want, **TOL)


def test_local_negatives_equal_each_workers_own_loss(run):
    """``loss.global_negatives=false``: each worker's loss of its own batch alone, averaged."""
    splits, results = run
    if 0 in splits:
        pytest.skip("a worker alone with an empty batch has no loss to compute")
    batch = _batch(sum(splits))
    start, parts = 0, []
    for rows in splits:
        local = {k: v[start:start + rows] for k, v in batch.items()}
        parts.append(_loss_and_grads(_model(_cfg("vse_mh")), local)[0])
        start += rows
    want = torch.stack(parts).mean()
    torch.testing.assert_close(results[("vse_mh", "global", False)]["loss"], want, **TOL)


