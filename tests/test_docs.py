"""The documented flow runs as written: the README's and docs' command blocks marked
``<!-- docs-test: NAME -->`` run verbatim (bash) in a fresh folder, every training command
shortened to one epoch by ``RAYCMR_OVERRIDES`` (documented in docs/serving.md).

A few minutes of training, indexing and serving: marked ``docs``, left out of ``make test`` and
run by ``make test-docs`` (``.ci/run`` runs both)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- docs-test: (\w+) -->\n```bash\n(.*?)```", re.DOTALL)
PORT = 8000  # the documented one


def doc_blocks() -> dict[str, str]:
    """``name -> bash text`` of every marked block in README.md and docs/*.md."""
    blocks: dict[str, str] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, text in MARKED.findall(path.read_text()):
            assert name not in blocks, f"two docs-test blocks named {name}"
            blocks[name] = text
    return blocks


def test_the_documented_blocks_are_marked() -> None:
    blocks = doc_blocks()
    assert set(blocks) == {"flow", "serve", "curl"}
    assert "raycmr serve" in blocks["serve"].splitlines()[-1]
    assert "ls -d" not in "".join(blocks.values())  # would pick Ray's snapshot json


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.docs
def test_the_serving_flow_runs_verbatim(tmp_path) -> None:
    if not _port_free(PORT):
        pytest.skip(f"port {PORT} (the documented one) is in use; stop what listens there")
    blocks = doc_blocks()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAYCMR_OVERRIDES": "train.epochs=1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYCMR_SERVE_TOKEN", None)

    def bash(script: str, timeout: int) -> str:
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], check=False,
                              cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=timeout)
        with open(tmp_path / "transcript.txt", "a") as fh:  # the whole console, for a person
            fh.write(f"$ {script}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    flow = bash(blocks["flow"], 1500)
    assert re.search(r"^last: +\S+/out/quickstart/runs/raycmr-\S+/checkpoint_\S+$", flow,
                     re.MULTILINE)
    assert re.search(r"^best: +\S+/out/quickstart/slow_runs/raycmr-\S+/checkpoint_\S+", flow,
                     re.MULTILINE)
    assert re.search(r"-> out/quickstart/index \[", flow)
    assert re.search(r"^\| fast\+slow \| 20 \|", flow, re.MULTILINE), flow
    serve_lines = blocks["serve"].rstrip("\n").splitlines()
    served = bash("\n".join(serve_lines[:-1]) + f"\n{serve_lines[-1]} > serve.out 2>&1 &\n"
                  "pid=$!\n"
                  # the app is up when the console says so (/healthz answers as soon as one
                  # Ingress replica runs, before the model replicas have started)
                  "for i in $(seq 300); do grep -q '^serving at' serve.out && break; sleep 1; done\n"
                  + blocks["curl"] +
                  "kill -TERM $pid\nwait $pid\n", 900)
    answers = [json.loads(line) for line in served.splitlines() if line.strip()]
    assert [len(a) for a in answers[:2]] == [5, 5], served
    assert [h["stage"] for h in answers[0]] == ["rerank"] * 5, answers[0]  # the slow stage ran
    assert answers[2]["stages"]["total"]["searches"] >= 1
    console = (tmp_path / "serve.out").read_text().splitlines()
    assert console[-1] == "stopped" and len(console) <= 12, console
    assert any(line.startswith(f"serving at http://127.0.0.1:{PORT}/") for line in console)
