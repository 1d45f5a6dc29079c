"""Peak memory of a command and every process it starts (Ray's workers included), and the size of
Ray's object spill directory, sampled in a background thread.

A local Ray cluster started by a command (``raycmr index``, ``raycmr train``) runs as that
command's descendants: the GCS, the raylet, and the ``ray::`` worker processes under it. The
sampler walks the tree every ``every_s`` seconds (USS every fourth time) and keeps, per role (driver, each ``ray::``
actor or task name, raylet, ...), the peak over its processes of two sizes:

* RSS, the resident set size. It counts every page of Ray's shared-memory object store that a
  process has touched, and those pages stay counted while the store is mapped: a long-lived
  worker's RSS drifts up towards the store's size as it reads blocks from different places in
  it, without holding any more data.
* USS, the unique set size: memory no other process shares, i.e. what the process itself holds
  (its heap, its tensors, copies it made of blocks). Whether a process "keeps" data as the input
  grows shows here.

The spill directory's size is sampled too (objects Ray wrote to disk because the store was full).
"""

from __future__ import annotations

import glob
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

SPILL_GLOB = "/tmp/ray/session_*/ray_spilled_objects*"


def _role(proc: psutil.Process, root_pid: int) -> str:
    """A short name for a process of the tree: driver, ray::<Actor/Task>, raylet, gcs, ..."""
    if proc.pid == root_pid:
        return "driver"
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split()[0]
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                "runtime_env", "default_worker"):
        if any(key in part for part in cmd[:3]):
            return key
    return proc.name()


def _dir_bytes(pattern: str) -> int:
    total = 0
    for root in glob.glob(pattern):
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
    return total


@dataclass
class TreePeaks:
    """What a sampled run used: per-role peak RSS (max over that role's processes), the peak of
    the whole tree's summed RSS, the peak spill-directory size, wall seconds, samples taken."""

    wall_s: float = 0.0
    samples: int = 0
    peak_rss: dict[str, int] = field(default_factory=dict)  # role -> max RSS of one process
    peak_uss: dict[str, int] = field(default_factory=dict)  # role -> max USS of one process
    peak_tree_rss: int = 0
    peak_tree_uss: int = 0
    peak_spilled: int = 0
    returncode: int | None = None

    def worker_peak(self, sizes: dict[str, int] | None = None) -> int:
        """Max size (RSS unless ``sizes`` is given) of any ``ray::`` worker process."""
        sizes = self.peak_rss if sizes is None else sizes
        return max((v for k, v in sizes.items() if k.startswith("ray::")), default=0)

    def to_dict(self) -> dict[str, Any]:
        mb = 2**20
        return {"wall_s": round(self.wall_s, 2), "samples": self.samples,
                "peak_rss_mb": {k: round(v / mb, 1) for k, v in sorted(self.peak_rss.items())},
                "peak_uss_mb": {k: round(v / mb, 1) for k, v in sorted(self.peak_uss.items())},
                "peak_driver_mb": round(self.peak_rss.get("driver", 0) / mb, 1),
                "peak_worker_mb": round(self.worker_peak() / mb, 1),
                "peak_tree_mb": round(self.peak_tree_rss / mb, 1),
                "peak_driver_uss_mb": round(self.peak_uss.get("driver", 0) / mb, 1),
                "peak_worker_uss_mb": round(self.worker_peak(self.peak_uss) / mb, 1),
                "peak_tree_uss_mb": round(self.peak_tree_uss / mb, 1),
                "peak_spilled_mb": round(self.peak_spilled / 2**20, 1),
                "returncode": self.returncode}


class TreeSampler:
    """Samples the process tree rooted at ``pid`` until :meth:`stop`."""

    def __init__(self, pid: int, every_s: float = 0.5, spill_glob: str = SPILL_GLOB):
        self.pid, self.every_s, self.spill_glob = pid, every_s, spill_glob
        self.peaks = TreePeaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._spill_every = 10  # samples between spill-directory walks (they cost more)
        # USS reads /proc/PID/smaps_rollup, a page-table walk that costs the kernel tens of ms
        # for a process mapping a large object store: every 4th sample only, so the sampling
        # itself does not slow what it measures
        self._uss_every = 4

    def start(self) -> TreeSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        with_uss = self.peaks.samples % self._uss_every == 0
        tree = tree_uss = 0
        for p in procs:
            try:
                mem = p.memory_full_info() if with_uss else p.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            role = _role(p, self.pid)
            tree += mem.rss
            sizes = [(self.peaks.peak_rss, mem.rss)]
            if with_uss:
                tree_uss += mem.uss
                sizes.append((self.peaks.peak_uss, mem.uss))
            for peaks, value in sizes:
                if value > peaks.get(role, 0):
                    peaks[role] = value
        self.peaks.peak_tree_rss = max(self.peaks.peak_tree_rss, tree)
        self.peaks.peak_tree_uss = max(self.peaks.peak_tree_uss, tree_uss)
        if self.peaks.samples % self._spill_every == 0:
            self.peaks.peak_spilled = max(self.peaks.peak_spilled, _dir_bytes(self.spill_glob))
        self.peaks.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def stop(self) -> TreePeaks:
        self._stop.set()
        self._thread.join()
        self.peaks.peak_spilled = max(self.peaks.peak_spilled, _dir_bytes(self.spill_glob))
        self.peaks.wall_s = time.perf_counter() - self._t0
        return self.peaks


def run_sampled(cmd: list[str], log_path: str, env: dict[str, str] | None = None,
                every_s: float = 0.5) -> TreePeaks:
    """Run ``cmd`` (stdout and stderr to ``log_path``) while sampling its process tree."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid, every_s).start()
        proc.wait()
        peaks = sampler.stop()
    peaks.returncode = proc.returncode
    return peaks
