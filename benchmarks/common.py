"""Shared helpers for the benchmark scripts: timing, thread pinning, tables and JSON results.

Every benchmark prints a table and writes ``benchmarks/results/<name>.json`` holding its rows,
its own settings (``meta``) and the machine it ran on (CPU count and model, library versions),
so numbers are never separated from the conditions that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
if str(REPO_ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` import raycmr
    sys.path.insert(0, str(REPO_ROOT))


def median_of(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls.

    The median (not the mean) so that one call slowed by a neighbour on a shared machine does
    not move the number.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 5,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of every ``fns[name]()`` over ``repeats`` rounds, one call of each
    function per round (after ``warmup`` untimed rounds).

    Interleaving puts the variants being compared under the same background load, so ratios
    taken within a round (``median_r t_a[r] / t_b[r]``) survive a busy shared machine far better
    than medians measured one variant after the other.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def set_threads(n: int) -> dict[str, int]:
    """Pin FAISS (OpenMP), torch and the BLAS libraries loaded so far to ``n`` threads.

    Returns what was set, for the result's ``meta``. Call it after importing the libraries to pin.
    """
    applied: dict[str, int] = {}
    try:
        import faiss

        faiss.omp_set_num_threads(n)
        applied["faiss_omp"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(n)
        applied["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n)  # numpy's OpenBLAS and any other BLAS/OpenMP pool loaded
        applied["blas"] = n
    except ImportError:
        pass
    return applied


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU count and model, OS, Python and the versions of the libraries benchmarks measure."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):  # other work on a shared machine skews every timing
        info["loadavg_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    for package in ("numpy", "torch", "ray", "faiss-cpu", "faiss-gpu", "deepspeed"):
        version = _version(package)
        if version is not None:
            info[package] = version
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    return info


def write_result(name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
                 results_dir: Path | None = None) -> Path:
    """Write ``{name, timestamp, machine, meta, rows}`` to ``<results_dir>/<name>.json``."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {
        "name": name,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "meta": meta or {},
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def parse_bench_args(p: argparse.ArgumentParser, argv: list[str] | None, name: str,
                     small: dict[str, Any]) -> argparse.Namespace:
    """``p``'s arguments plus ``--seed`` and ``--out`` (the result's name, default ``name``),
    parsed from ``argv``; with ``--small`` (an argument of ``p``) the values of ``small``."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=name, help="result name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.small:
        vars(args).update(small)
    return args


def save_run(args: argparse.Namespace, rows: list[dict[str, Any]], meta: dict[str, Any]) -> int:
    """Write the result ``args.out`` (its meta: ``args`` and ``meta``), say where; returns 0."""
    path = write_result(args.out, rows, {**vars(args), **meta})
    print(f"\nwrote {path}")
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.4f}" if magnitude >= 1e-3 else f"{value:.2e}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None,
                title: str | None = None, formats: dict[str, str] | None = None) -> str:
    """Print ``rows`` as an aligned text table and return the text.

    ``columns`` default to the keys of the rows in order of appearance; ``formats`` maps a column
    to a format spec (``{"recall@10": ".3f"}``), other cells get a magnitude-based default and
    missing values print as ``-``.
    """
    formats = formats or {}
    if not rows:
        text = "(no rows)"
        print(text)
        return text
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return "-"
        if column in formats:
            return format(value, formats[column])
        return _fmt(value)

    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(values, widths))

    parts = [title] if title else []
    parts += [line(list(columns)), "  ".join("-" * w for w in widths)]
    parts += [line(r) for r in cells]
    text = "\n".join(parts)
    print(text, flush=True)
    return text
