"""Run the benchmarks one after another and rewrite BENCHMARKS.md with their latest tables.

Each benchmark runs as its own subprocess (a fresh interpreter and, where it uses one, a fresh
local Ray instance), its output streamed here; its table comes back through the JSON it writes
to ``benchmarks/results/``. BENCHMARKS.md at the repository root then gets, for each benchmark,
the table, the headline ratios and how long it took, plus the machine (CPU count and model,
library versions, load average before and after: the figures of a shared machine are noisy, so
every benchmark compares its arms side by side in one run) and the date.

``bench_gpu`` is in the list too: on a machine without a GPU it exits at once with a
``SKIPPED:`` line, which BENCHMARKS.md records instead of a table.

    python benchmarks/run_all.py --small          # what `make bench` runs
    python benchmarks/run_all.py --only bench_index --small
    python benchmarks/run_all.py --render-only    # rewrite BENCHMARKS.md from the JSON files
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # `python -m benchmarks.run_all` from the repo root
    from benchmarks.common import REPO_ROOT, RESULTS_DIR, _fmt, machine_info
except ImportError:  # `python benchmarks/run_all.py`
    from common import REPO_ROOT, RESULTS_DIR, _fmt, machine_info

BENCH_DIR = REPO_ROOT / "benchmarks"
BENCHMARKS = ["bench_ingest", "bench_train_overhead", "bench_global_negatives", "bench_validation",
              "bench_index", "bench_progress",
              "bench_gpu"]
# long runs with their own commands (minutes to an hour): shown in BENCHMARKS.md from their last
# result, run only when named with --only
SEPARATE = ["bench_million", "bench_streaming"]
# bench_index (written before the result conventions grew titles and summaries)
DEFAULT_COLUMNS = {
    "bench_index": ["data", "N", "method", "params", "build_s", "search_s", "qps", "recall@10",
                    "x_flat"],
}
DEFAULT_FORMATS = {
    "bench_index": {"recall@10": ".3f", "x_flat": ".2f", "qps": ",.0f", "build_s": ".2f",
                    "search_s": ".3f"},
}
SKIPPED = "SKIPPED:"
RUNS_FILE = "run_all.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="pass --small to every benchmark")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS + SEPARATE, help="run only these")
    p.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="do not run these")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing; rewrite BENCHMARKS.md from benchmarks/results/*.json")
    p.add_argument("--output", default=str(REPO_ROOT / "BENCHMARKS.md"))
    return p.parse_args(argv)


def run_one(name: str, small: bool) -> dict[str, Any]:
    """Run ``benchmarks/<name>.py`` with its output streamed through; returns rc, wall, tail."""
    script = BENCH_DIR / f"{name}.py"
    cmd = [sys.executable, str(script)] + (["--small"] if small else [])
    shown = " ".join([str(script.relative_to(REPO_ROOT))] + cmd[2:])
    print(f"\n===== {name}: {shown}", flush=True)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    wall = time.perf_counter() - start
    skipped = next((ln for ln in lines if ln.startswith(SKIPPED)), None)
    status = "skipped" if rc == 0 and skipped else "ok" if rc == 0 else f"failed (exit {rc})"
    print(f"===== {name}: {status} in {wall:.0f} s", flush=True)
    return {"name": name, "rc": rc, "wall_s": wall, "status": status, "skip_line": skipped,
            "tail": lines[-15:], "command": shown,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def load_runs() -> dict[str, dict[str, Any]]:
    """How each benchmark's last run through this script went (``results/run_all.json``)."""
    path = RESULTS_DIR / RUNS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def save_runs(runs: dict[str, dict[str, Any]]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / RUNS_FILE).write_text(json.dumps(runs, indent=2) + "\n")


def load_result(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def first_line(name: str) -> str:
    try:
        doc = ast.get_docstring(ast.parse((BENCH_DIR / f"{name}.py").read_text()))
    except (OSError, SyntaxError):
        return ""
    return doc.splitlines()[0] if doc else ""


def _cell(value: Any, spec: str | None) -> str:
    if value is None:
        return "-"
    text = format(value, spec) if spec and isinstance(value, (int, float)) else _fmt(value)
    return text.replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]], columns: list[str],
                   formats: dict[str, str] | None = None) -> str:
    """A GitHub table; ``formats`` as for ``common.print_table`` (the script's own choices)."""
    formats = formats or {}
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c), formats.get(c)) for c in columns) + " |"
              for r in rows]
    return "\n".join(lines)


def section(name: str, result: dict[str, Any] | None, run: dict[str, Any] | None) -> str:
    out = [f"## {name}", "", f"`benchmarks/{name}.py`: {first_line(name)}", ""]
    if run is not None:
        load = (f", load average {run['load_before']:.0f} at the start and "
                f"{run['load_after']:.0f} at the end" if "load_before" in run else "")
        out.append(f"Last run: `{run['command']}`, {run['status']} in {run['wall_s']:.0f} s "
                   f"(finished {run.get('finished', '?')}{load}).")
        out.append("")
        if run["status"] == "skipped":
            out += [f"> {run['skip_line']}", ""]
            if result is not None:
                when = (f"Last result below is from {result['timestamp']} on "
                        f"{result['machine'].get('cpu_model', '?')}.")
                out += [when, ""]
            else:
                return "\n".join(out)
        elif run["rc"] != 0:
            out += ["Last lines of its output:", "", "```", *run["tail"], "```", ""]
            if result is None:
                return "\n".join(out)
            out += [f"Last successful result below is from {result['timestamp']}.", ""]
    if result is None:
        return "\n".join(out + ["(no result yet)", ""])
    meta = result.get("meta", {})
    rows = result.get("rows", [])
    if meta.get("title"):
        out += [f"**{meta['title']}**", ""]
    if "search_columns" in meta:  # bench_gpu: a training table and a search table
        train = [r for r in rows if r.get("part") != "search"]
        search = [r for r in rows if r.get("part") == "search"]
        out += [markdown_table(train, meta["columns"], meta.get("formats")), "",
                markdown_table(search, meta["search_columns"], meta.get("formats"))]
    else:
        columns = meta.get("columns") or DEFAULT_COLUMNS.get(name) or list(rows[0] if rows else [])
        formats = meta.get("formats") or DEFAULT_FORMATS.get(name)
        out.append(markdown_table(rows, columns, formats))
    out.append("")
    for table in meta.get("extra_tables", []):  # e.g. bench_train_overhead's step profile
        out += [f"**{table['title']}**", "",
                markdown_table(table["rows"], table["columns"], table.get("formats")), ""]
    for line in meta.get("summary", []):
        out.append(f"- {line}")
    if meta.get("summary"):
        out.append("")
    machine = result.get("machine", {})
    load = machine.get("loadavg_1_5_15min")
    load_text = f", load average {load[0]:.1f} when it finished" if load else ""
    written = (f"Result written {result['timestamp']} ({machine.get('cpu_count')} x "
               f"{machine.get('cpu_model')}{load_text}); raw numbers and settings in "
               f"`benchmarks/results/{name}.json`.")
    out += [written, ""]
    return "\n".join(out)


def render(runs: dict[str, dict[str, Any]], output: Path, small: bool) -> None:
    """BENCHMARKS.md with every benchmark's latest result (run now or earlier)."""
    info = machine_info()
    versions = ", ".join(f"{k} {v}" for k, v in info.items()
                         if k not in ("cpu_count", "cpu_model", "platform", "loadavg_1_5_15min"))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Benchmarks",
        "",
        "Side-by-side measurements of raycmr against what users would use instead. Written by "
        "`benchmarks/run_all.py`" + (" --small" if small else "") + " (`make bench`); do not "
        "edit by hand.",
        "",
        f"- date: {now}",
        f"- machine: {info['cpu_count']} CPUs, {info['cpu_model']}, {info['platform']}",
        f"- versions: {versions}",
    ]
    parts += [
        "",
        ("The machine these ran on is shared: other jobs come and go, so absolute rates move "
         "from one run to the next. Each benchmark therefore measures its arms side by side in "
         "one run (repetitions interleaved, medians): read the ratios, not the absolute "
         "numbers."),
        "",
    ]
    for name in BENCHMARKS + SEPARATE:
        parts.append(section(name, load_result(name), runs.get(name)))
    output.write_text("\n".join(parts).rstrip() + "\n")
    print(f"\nwrote {output}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    runs = load_runs()
    failed = []
    if not args.render_only:
        for name in names:
            runs[name] = run_one(name, args.small)
            save_runs(runs)
            if runs[name]["rc"] != 0:
                failed.append(name)
    render(runs, Path(args.output), args.small)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
