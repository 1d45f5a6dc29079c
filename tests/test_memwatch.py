"""benchmarks/memwatch.py: the peak RSS it reports for a process tree matches what the processes
allocated (a parent and a child that each hold a known number of bytes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from memwatch import run_sampled

MB = 2**20
CHILD = """
import subprocess, sys, time
buf = bytearray({parent} * 2**20)  # touched: bytearray zero-fills
child = subprocess.Popen([sys.executable, "-c",
    "import time; b = bytearray({child} * 2**20); time.sleep(1.5)"])
child.wait()
time.sleep(0.3)
"""


def test_peaks_of_a_parent_and_its_child(tmp_path):
    peaks = run_sampled([sys.executable, "-c", CHILD.format(parent=300, child=150)],
                        str(tmp_path / "log.txt"), every_s=0.1)
    assert peaks.returncode == 0
    driver = peaks.peak_rss["driver"]
    others = [v for k, v in peaks.peak_rss.items() if k != "driver"]
    # each process holds its buffer plus an interpreter (10-40 MB)
    assert 300 * MB <= driver <= 360 * MB
    assert len(others) == 1 and 150 * MB <= others[0] <= 210 * MB
    assert 450 * MB <= peaks.peak_tree_rss <= 570 * MB
    assert peaks.samples >= 10 and peaks.wall_s >= 1.5
    # nothing is shared here: each process's own (unique) memory holds its buffer too
    assert 300 * MB <= peaks.peak_uss["driver"] <= driver
