"""torch.distributed code timed in ``world`` spawned gloo processes on this machine (no Ray):
:func:`run_spawned` starts the ranks and returns what rank 0 wrote; each rank's worker runs its
work inside :func:`gloo_rank`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raycmr.distributed import end_spawned_process


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, threads: int) -> Iterator[None]:
    """This process as rank ``rank`` of a gloo group of ``world`` on ``127.0.0.1:port`` with
    ``threads`` torch threads; when the work is done, the group is destroyed and the process
    ended (:func:`raycmr.distributed.end_spawned_process`)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
    end_spawned_process()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(worker: Callable[[int, int, int, dict[str, Any], str], None], world: int,
                job: dict[str, Any]) -> Any:
    """Run ``worker(rank, world, port, job, out_path)`` in ``world`` spawned processes and
    return the JSON that rank 0 wrote to ``out_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.json")
        mp.start_processes(worker, args=(world, free_port(), job, path), nprocs=world,
                           join=True, start_method="spawn")
        return json.loads(Path(path).read_text())
