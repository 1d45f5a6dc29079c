"""raycmr's local cluster (raycmr.runtime.start_local_ray) is the one its own processes reach
when they resolve an address by themselves (the State API with no address, as Ray Train's
PlacementGroupCleaner builds it), even with a stale ``ray_current_cluster`` file naming a dead
cluster and other live clusters on the machine (the session's test cluster at least).

The child runs with its own Ray temp folder (RAY_TMPDIR), where the test writes the stale file:
the machine's real /tmp/ray is never touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raycmr.runtime import start_local_ray

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, ray
from raycmr.runtime import start_local_ray

gcs = start_local_ray(num_cpus=2, log_to_driver=False)

@ray.remote(num_cpus=0)
class Marker:
    def ping(self):
        return 1

marker = Marker.options(name="raycmr-marker").remote()
ray.get(marker.ping.remote())

@ray.remote(num_cpus=0)
def probe():
    from ray.util.state import list_actors  # no address: resolved as Ray's own helpers do
    found = list_actors(filters=[("name", "=", "raycmr-marker"), ("state", "=", "ALIVE")],
                        timeout=30)
    return os.environ.get("RAY_ADDRESS"), [a.name for a in found]

address, names = ray.get(probe.remote(), timeout=120)
print(json.dumps({"gcs": gcs, "task_address": address, "found": names}))
ray.shutdown()
"""


@pytest.mark.ray
def test_helpers_reach_this_cluster_despite_a_stale_ray_current_cluster(ray_cluster) -> None:
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nobody listens
        env = {**os.environ, "RAY_TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, check=False,
                             text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["task_address"] == got["gcs"]  # not the stale file's, not the session's
        assert got["gcs"] != ray_cluster.get_runtime_context().gcs_address
        assert got["found"] == ["raycmr-marker"]
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_node_that_does_not_start_in_time_is_one_line(monkeypatch) -> None:
    """Ray gives a local node a fixed 30 s to register; on a busy machine it raises a bare
    Exception. raycmr turns exactly that one into a ConfigError with the load and the fix, and
    lets any other failure through unchanged."""
    import ray

    from raycmr.config import ConfigError
    from raycmr.runtime import GCS_PORT_VARIABLE

    ray_says = ("The current node timed out during startup. This could happen because some of "
                "the raylet failed to startup or the GCS has become overloaded.")

    def timed_out(**kwargs):
        raise Exception(ray_says)  # noqa: TRY002 - the bare Exception Ray raises

    monkeypatch.delenv(GCS_PORT_VARIABLE, raising=False)
    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(ConfigError, match=r"^the local Ray cluster did not start within Ray's "
                                          r"30 s \(load average \d+ on \d+ cores\): run again "
                                          r"when .* set RAY_ADDRESS=auto$"):
        start_local_ray(num_cpus=2)
    assert GCS_PORT_VARIABLE not in os.environ  # put back as it was

    def other(**kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(ray, "init", other)
    with pytest.raises(RuntimeError, match="^something else$"):
        start_local_ray(num_cpus=2)
