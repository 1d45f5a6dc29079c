import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

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
    2 training workers and Ray Data tasks fit side by side). The dashboard runs, as in
    :func:`raycmr.runtime.init_ray`: Ray Train frees a stopped trial's placement group through
    its State API."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, log_to_driver=False)
    yield ray
    ray.shutdown()


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
