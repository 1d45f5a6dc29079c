"""Two real processes start and stop a gloo process group many times in a row, with the
collectives a training step makes in between (the packed all_gather, the gradient all_reduce,
a barrier), ending the way raycmr's benchmarks and tests end theirs: every cycle must finish
with exact results and both processes must exit cleanly. The abort seen in
`bench_global_negatives --small` ("terminate called without an active exception", a gloo rank
killed by SIGABRT) came after both ranks had returned from their work, in the interpreter's
teardown; spawned ranks now end with `raycmr.distributed.end_spawned_process`, which skips it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from raycmr.distributed import end_spawned_process

CYCLES = 25


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    # One rendezvous store for all cycles (each cycle under its own prefix), so that a cycle
    # costs the process group's start and stop, not a TCP store's connect-retry back-off.
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    results = []
    for cycle in range(CYCLES):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"cycle{cycle}", store),
                                rank=rank, world_size=world)
        try:
            mine = torch.full((4, 3), float(rank + 10 * cycle))
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            total = torch.tensor([float(rank + 1)])
            dist.all_reduce(total)
            dist.barrier()
            results.append([float(g[0, 0]) for g in gathered] + [float(total)])
        finally:
            dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    end_spawned_process()


@pytest.mark.timeout(300)
def test_gloo_group_starts_and_stops_many_times(tmp_path):
    path = str(tmp_path / "results.json")
    ctx = mp.start_processes(_worker, args=(2, free_port(), path), nprocs=2, join=False,
                             start_method="spawn")
    while not ctx.join():
        pass
    assert [p.exitcode for p in ctx.processes] == [0, 0]  # no SIGABRT (exit code -6)
    results = json.loads(Path(path).read_text())
    assert results == [[10.0 * c, 1 + 10.0 * c, 3.0] for c in range(CYCLES)]
