"""`raycmr serve` that cannot start says why in one line (exit status 2), never a traceback:
a port another server holds (checked before Ray starts), and a replica that fails in its
constructor (its own error's last line, named by deployment; the whole error in serve.log)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_serve import write_checkpoint, write_gallery

TOKEN = "start-errors-token"


def _serve(tmp_path: Path, checkpoint: Path, port: int) -> subprocess.CompletedProcess:
    # one constructor try per replica (Serve's default is 3: the same error three times)
    env = {**os.environ, "RAYCMR_SERVE_TOKEN": TOKEN, "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}
    env.pop("RAY_ADDRESS", None)  # its own local cluster, as a user's first run
    return subprocess.run(
        [str(Path(sys.executable).parent / "raycmr"), "serve", "--checkpoint", str(checkpoint),
         "--index", str(tmp_path / "index"), "--port", str(port), "--replicas", "1",
         "--max-replicas", "1"],
        capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.ray
def test_a_taken_port_and_a_failing_replica_are_one_line_each(ray_cluster, tmp_path) -> None:
    from raycmr.index.gallery import build_gallery_index

    write_gallery(tmp_path / "gallery")
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoint_000000", str(tmp_path / "gallery"))
    build_gallery_index(str(run), "test", tmp_path / "index", num_actors=1, batch_size=16)
    log = run / "serve.log"
    first = f"serve: Ray Serve's and the replicas' lines go to {log} (--verbose shows them here)"

    with socket.socket() as held:  # another server on the port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = _serve(tmp_path, run, port)
    assert taken.returncode == 2, taken.stdout + taken.stderr
    assert taken.stdout.splitlines() == [first]
    said = (f"raycmr: error: port {port} on 127.0.0.1 is in use (another server?): stop it, or "
            "pass --port with a free one")
    assert taken.stderr.splitlines() == [said]

    weights = run / "checkpoint_000000" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:5000])  # a truncated copy: the replicas fail
    broken = _serve(tmp_path, run, free_port())
    assert broken.returncode == 2, broken.stdout + broken.stderr
    assert broken.stdout.splitlines() == [first]
    (error,) = broken.stderr.splitlines()
    assert error.startswith("raycmr: error: the service did not start: QueryEncoder: "), error
    assert error.endswith(f"(the whole error and the replicas' lines are in {log})"), error
    assert "Traceback" in log.read_text()  # the whole error went to the log
