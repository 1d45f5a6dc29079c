"""Compositional hard negatives in the global InfoNCE loss (raycmr/losses/hard_negatives.py):
equal to an explicit per-anchor loop in one process, and a real 2-process gloo run (negatives
gathered across workers, unequal row counts) equals the single-process loss and gradients."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from raycmr.distributed import end_spawned_process
from raycmr.losses.batch import global_batch, local_batch
from raycmr.losses.hard_negatives import (
    infonce_hard_negatives_loss,
    infonce_own_hard_negatives_loss,
)
from raycmr.train.contrastive import hard_negative_rows

N, K, D = 8, 3, 5
GROUPS = torch.tensor([0, 1, 2, 3, 3, 5, 6, 7])  # rows 3 and 4: two captions of one image
LOGIT_SCALE = torch.tensor([math.log(1 / 0.1)], dtype=torch.float64)


def _data():
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.ones(N, K, dtype=torch.bool)
    valid[1, 1:] = False   # one perturbation only
    valid[5] = False       # a caption the perturber could not change
    return unit(N, D), unit(N, D), unit(N, K, D), valid


def explicit_loss(img, txt, neg, valid):
    """The NegCLIP InfoNCE written as a loop over anchors."""
    t = math.exp(LOGIT_SCALE.item())
    total = 0.0
    for i in range(N):
        cols = [j for j in range(N) if j == i or GROUPS[j] != GROUPS[i]]
        i2t = [t * img[i] @ txt[j] for j in cols] + \
            [t * img[i] @ neg[i, m] for m in range(K) if valid[i, m]]
        t2i = [t * img[j] @ txt[i] for j in cols]
        own = cols.index(i)
        total = total - torch.log_softmax(torch.stack(i2t), 0)[own] \
            - torch.log_softmax(torch.stack(t2i), 0)[own]
    return 0.5 * total / N


def test_single_process_equals_the_explicit_loop():
    img, txt, neg, valid = (x.clone().requires_grad_(x.is_floating_point()) for x in _data())
    out = infonce_hard_negatives_loss(local_batch(img, txt, GROUPS), neg, valid, LOGIT_SCALE)
    ref = explicit_loss(img, txt, neg, valid)
    assert torch.allclose(out.loss, ref, atol=1e-12)
    got = torch.autograd.grad(out.loss, [img, txt, neg])
    want = torch.autograd.grad(ref, [img, txt, neg])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)
    # the unchanged caption's image (row 5) sees in-batch negatives only: its hard negatives
    # get no gradient, and the loss differs from plain InfoNCE only through the other rows
    assert torch.equal(got[2][5], torch.zeros(K, D, dtype=torch.float64))


def _worker(rank, world, port, splits, path, anchors):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt, neg, valid = _data()
        start, rows = sum(splits[:rank]), splits[rank]
        mine = [x[start:start + rows].clone().requires_grad_() for x in (img, txt, neg)]
        pad = max(splits)
        batch = global_batch(mine[0], mine[1], GROUPS[start:start + rows], pad, anchors,
                             extra_txt=hard_negative_rows(mine[2], valid[start:start + rows]))
        valid_all = batch.extra_txt.detach().abs().amax(dim=-1) > 0
        loss = infonce_own_hard_negatives_loss(batch, LOGIT_SCALE).loss
        loss.backward()
        # the optimizer averages gradients over workers: each rank's share is grad / world
        grads = [p.grad / world for p in mine]
        parts = [None] * world
        dist.all_gather_object(parts, (loss.item(), valid_all.tolist(), grads))
        if rank == 0:
            torch.save(parts, path)
    finally:
        dist.destroy_process_group()
    end_spawned_process()


@pytest.mark.parametrize("anchors", ["global", "local"])
def test_two_workers_gather_the_hard_negatives_exactly(tmp_path, anchors):
    splits = [3, 5]
    path = str(tmp_path / "parts.pt")
    mp.start_processes(_worker, args=(2, free_port(), splits, path, anchors), nprocs=2,
                       join=True, start_method="spawn")
    parts = torch.load(path)
    img, txt, neg, valid = (x.clone().requires_grad_(x.is_floating_point()) for x in _data())
    ref = explicit_loss(img, txt, neg, valid)
    want = torch.autograd.grad(ref, [img, txt, neg])
    for _, valid_all, _ in parts:
        assert valid_all == valid.tolist()
    losses = [p[0] for p in parts]
    # global: every rank computes the whole loss; local: the ranks' losses average to it
    if anchors == "global":
        assert all(abs(loss - ref.item()) < 1e-12 for loss in losses)
    else:
        assert abs(sum(losses) / len(losses) - ref.item()) < 1e-12
    for which in range(3):
        got = torch.cat([p[2][which] for p in parts])
        assert torch.allclose(got, want[which], atol=1e-12)
