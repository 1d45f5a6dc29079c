"""N workers x batch B == 1 worker x batch N*B: loss and (worker-averaged) gradients of a real
2-process gloo run equal the single-process run on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from raycmr.config import load_config
from raycmr.distributed import end_spawned_process
from raycmr.train.dual_encoder.objective import CrossModalObjective

OVERRIDES = [
    "data.kind=features", "model.image.kind=mlp", "model.image.input_dim=6",
    "model.image.hidden_dims=[16]", "model.text.kind=mlp", "model.text.input_dim=5",
    "model.text.hidden_dims=[16]", "model.embed_dim=8", "loss.margin=0.3",
]


def _cfg(kind: str, global_negatives: bool = True):
    return load_config(None, OVERRIDES + [f"loss.kind={kind}",
                                          f"loss.global_negatives={global_negatives}"])


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
    out = model(batch)
    model.zero_grad()
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def _worker(rank, world, port, kind, global_negatives, splits, result_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = _cfg(kind, global_negatives)
        batch = _batch(sum(splits))
        start = sum(splits[:rank])
        local = {k: v[start:start + splits[rank]] for k, v in batch.items()}
        loss, grads = _loss_and_grads(_model(cfg), local)
        # what DDP / DeepSpeed do to gradients: average over workers
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world, "grads": grads}, result_path)
    finally:
        dist.destroy_process_group()
    end_spawned_process()




def _run_two(kind, global_negatives, splits, tmp_path):
    path = str(tmp_path / f"{kind}-{global_negatives}-{splits}.pt")
    mp.start_processes(_worker, args=(2, free_port(), kind, global_negatives, splits, path),
                       nprocs=2, join=True, start_method="spawn")
    return torch.load(path)


@pytest.mark.parametrize("kind", ["vse_mh", "vse_sh", "infonce"])
@pytest.mark.parametrize("splits", [(5, 5), (6, 4)])  # equal, and unequal (rows dropped)
def test_two_workers_equal_single_process(kind, splits, tmp_path):
    single_loss, single_grads = _loss_and_grads(_model(_cfg(kind)), _batch(sum(splits)))
    multi = _run_two(kind, True, splits, tmp_path)
    assert multi["loss"].item() == pytest.approx(single_loss.item(), abs=1e-5)
    assert set(multi["grads"]) == set(single_grads)
    for name, g in single_grads.items():
        assert torch.allclose(multi["grads"][name], g, atol=1e-5, rtol=0), name
        assert g.abs().max() > 1e-6  # the gradient is not trivially zero


def test_local_negatives_switch_differs_from_global(tmp_path):
    single_loss, _ = _loss_and_grads(_model(_cfg("vse_mh")), _batch(10))
    local = _run_two("vse_mh", False, (5, 5), tmp_path)
    # local negatives see 4 negatives per anchor instead of 9: a different (smaller) MH loss
    assert local["loss"].item() < single_loss.item() - 1e-3


def _uneven_worker(rank, world, port, result_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from raycmr import distributed

        mine = [f"r{rank}b{i}" for i in range(3 - rank)]  # rank 0: 3 batches, rank 1: 2
        got = []
        for item in distributed.while_all_have(mine):
            got.append(item)
            distributed.all_reduce_sum(1.0)  # a collective per step, as a training step has
        after = distributed.all_reduce_sum(rank + 1)  # still in step: 1 + 2
        torch.save({"got": got, "after": after}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()
    end_spawned_process()


def test_while_all_have_stops_every_rank_when_one_runs_out(tmp_path):
    """A worker with fewer full batches (bad rows dropped after the split) stops all workers at
    the same step instead of leaving the others in a collective forever."""
    path = str(tmp_path / "uneven")
    mp.start_processes(_uneven_worker, args=(2, free_port(), path), nprocs=2, join=True,
                       start_method="spawn")
    results = [torch.load(f"{path}.{r}") for r in range(2)]
    assert results[0]["got"] == ["r0b0", "r0b1"] and results[1]["got"] == ["r1b0", "r1b1"]
    assert results[0]["after"] == results[1]["after"] == 3.0
