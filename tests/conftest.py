import contextlib
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s)
# and takes one report per poll (a worker's queue holds one): each epoch of a test's tiny runs
# would last 2 s, and each run would end up to 2 s after its last step. Propagated by Ray Train
# from the driver's environment to its controller; `raycmr tune` and clusters started here
# inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# The real labelled Wikipedia features (../shared/data/wikipedia next to the repository, or
# RAYCMR_WIKIPEDIA_DIR). Tests that need them skip, naming the path, when they are absent.
WIKIPEDIA = Path(os.environ.get(
    "RAYCMR_WIKIPEDIA_DIR",
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikipedia"))
needs_wikipedia = pytest.mark.skipif(
    not (WIKIPEDIA / "raw_features.mat").is_file(),
    reason=f"Wikipedia features not found at {WIKIPEDIA} (set RAYCMR_WIKIPEDIA_DIR)")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (8 logical CPUs on 2 cores, so that
    2 training workers and Ray Data tasks fit side by side), started as
    :func:`raycmr.runtime.init_ray` starts one: its workers resolve "auto" to it, whatever else
    runs on the machine. The dashboard runs: Ray Train frees a stopped trial's placement group
    through its State API."""
    import ray

    from raycmr.runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=8, log_to_driver=False)
    yield ray
    ray.shutdown()


SHARD_ROWS = {"train": 128, "val": 24, "test": 8}


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Synthetic image/caption shards shared by the tiny training runs (read-only: a test that
    needs a changed copy writes it under its own tmp_path): 128 training rows (2 workers x 4
    batches of 16), 24 validation and 8 test rows, 32x32 images, 64 rows per file (train: 2)."""
    from raycmr.data.synthetic import write_synthetic_splits

    root = tmp_path_factory.mktemp("synthetic_shards")
    write_synthetic_splits(root, n_train=SHARD_ROWS["train"], n_val=SHARD_ROWS["val"],
                           n_test=SHARD_ROWS["test"], seed=5, image_size=32, rows_per_shard=64)
    return root


def two_worker_run(train, shards, storage, name: str, batch_size: int) -> list[str]:
    """Overrides of a tiny 2-worker, 1-epoch run on 32x32 synthetic images: ``train`` (a list
    of paths) to train on, ``shards``' val and test splits, the run at ``storage``/``name``."""
    return [
        f"data.train=[{', '.join(map(str, train))}]", f"data.val=[{shards}/val]",
        f"data.test=[{shards}/test]",
        "data.image_size=32", "data.max_text_len=16", "data.shuffle_buffer=32",
        "train.num_workers=2", f"train.batch_size={batch_size}", "train.epochs=1",
        "train.warmup_steps=2", "train.log_every=2", "train.max_failures=0",
        f"train.storage_path={storage}", f"train.name={name}", "train.torch_threads=1",
    ]


def pytest_runtest_logreport(report):
    """Print a failure's traceback as soon as it happens: pytest's own summary comes only at the
    end, and a crash while tearing down the Ray cluster would otherwise take it with it."""
    if report.failed:
        sys.stderr.write(f"\n[raycmr tests] FAILED {report.nodeid} ({report.when})\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()


def free_port() -> int:
    """A TCP port nobody listens on now (for a test's own torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(tmp: Path, token: str, args: dict):
    """The raycmr Serve app built from ``args`` on a free local port, its bearer token in a file
    under ``tmp``: yields ``(args, client, url, headers)`` (the app's full args and an httpx
    client that sends the token); shuts Serve down afterwards."""
    import httpx
    from ray import serve

    from raycmr.serve.app import APP_NAME, build_app

    port = free_port()
    (tmp / "token").write_text(token + "\n")
    args = {**args, "token_env": "", "token_file": str(tmp / "token")}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    client = httpx.Client(base_url=url, timeout=120, headers=headers)
    try:
        yield args, client, url, headers
    finally:
        client.close()
        serve.shutdown()


def _gloo_rank(rank: int, world: int, port: int, path: str, body, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    from raycmr.distributed import end_spawned_process

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(body(rank, world, *args), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()
    end_spawned_process()


def on_gloo_ranks(body, world: int, path: str, *args) -> list:
    """``body(rank, world, *args)`` in ``world`` spawned processes joined by a gloo process group
    (MASTER_ADDR, RANK, ... set as torchrun sets them); returns their results, by rank."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_rank, args=(world, free_port(), path, body, args), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(f"{path}.{r}") for r in range(world)]
