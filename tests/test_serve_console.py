"""`raycmr serve` as a person runs it: a few lines, not Ray Serve's log; SIGTERM stops it like
Ctrl-C ("stopped", exit status 0, no C++ stack dump)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_serve import write_checkpoint, write_gallery

TOKEN = "console-test-token"
EVERY = 1  # --status-every: one status line per second that saw requests
TOTAL = "(total: 22 requests, 0 errors)"


@pytest.mark.ray
def test_serve_console_is_quiet_and_sigterm_stops_it(ray_cluster, tmp_path) -> None:
    from raycmr.index.gallery import build_gallery_index

    write_gallery(tmp_path / "gallery")
    write_checkpoint(tmp_path / "run" / "checkpoint_000000", str(tmp_path / "gallery"))
    build_gallery_index(str(tmp_path / "run"), "test", tmp_path / "index", num_actors=1,
                        batch_size=16)
    port = free_port()
    env = {**os.environ, "RAYCMR_SERVE_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "raycmr"), "serve", "--checkpoint", str(tmp_path / "run"),
         "--index", str(tmp_path / "index"), "--port", str(port), "--replicas", "1",
         "--max-replicas", "1", "--status-every", str(EVERY)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    printed: list[str] = []  # the console, line by line as it comes
    reader = threading.Thread(target=lambda: printed.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "".join(printed)
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "raycmr serve did not come up in 300 s"
            time.sleep(0.25)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        started = time.monotonic()
        statuses = [httpx.post(f"{url}/search", json={"text_feat": [0.1] * 8, "k": 3},
                               headers=headers, timeout=60).status_code for _ in range(20)]
        statuses.append(httpx.post(f"{url}/search", json={"k": 3}, timeout=60).status_code)
        # until a status line counts every request (20 searches, one 401, the first healthz)
        while not any(TOTAL in line for line in printed):
            assert time.monotonic() < started + 120, (statuses, "".join(printed))
            time.sleep(0.1)
        seconds = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    out = "".join(printed)
    lines = out.splitlines()
    assert proc.returncode == 0, out
    assert lines[-1] == "stopped", out
    assert "SIGTERM" not in out and "logging.cc" not in out and "Traceback" not in out, out
    log = tmp_path / "run" / "serve.log"
    assert lines[0] == f"serve: Ray Serve's and the replicas' lines go to {log} (--verbose " \
                       "shows them here)"
    assert lines[1].startswith(f"serving at {url}/ (search page)")
    assert lines[2] == "token: from $RAYCMR_SERVE_TOKEN"
    assert lines[3].startswith("index: flat over")
    status = [ln for ln in lines if "requests/s" in ln]
    # at most one line per interval (one more for the healthz's, just before `started`)
    assert 1 <= len(status) <= seconds / EVERY + 2, (seconds, out)
    assert status[-1].endswith(TOTAL), (statuses, out)
    assert len(lines) <= 5 + len(status) + 1, out  # nothing else: no Serve or replica lines
    assert "ServeReplica" in log.read_text() or "serve" in log.read_text().lower()
