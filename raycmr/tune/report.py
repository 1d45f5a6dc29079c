"""What a search leaves behind, written into the experiment dir:

- ``results.csv`` / ``results.parquet``: one row per trial -- ``trial_id``, each searched key, the
  trial's best value of the validation metric and the epoch it was reached (``best_epoch``),
  ``epochs`` run, ``status`` (completed, stopped = early-stopped by ASHA or the time budget,
  error, not run), ``error`` (one line), ``checkpoint`` (of the best epoch);
- ``metric_vs_params.png``: the metric against each searched key, one panel each;
- ``best_config.yaml``: the base config with the best trial's parameters (``train.name`` and
  ``train.resume_from`` cleared), ready for ``raycmr train --config best_config.yaml``;
- ``best.json``: the best trial's id, metric, parameters and checkpoint path.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd

from raycmr.config import Config, with_overrides

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
PLOT_PNG = "metric_vs_params.png"
BEST_CONFIG = "best_config.yaml"
BEST_JSON = "best.json"

COMPLETED, STOPPED, ERROR, NOT_RUN = "completed", "stopped", "error", "not run"
STATUS_COLORS = {COMPLETED: "tab:blue", STOPPED: "tab:orange"}


def error_summary(error: Any, limit: int = 300) -> str:
    """One line for a trial's error: the last ``SomeError: message`` line of its text."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    pattern = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b")
    matches = [ln for ln in lines if pattern.match(ln)]
    line = matches[-1] if matches else f"{type(error).__name__}: {lines[0]}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _trial_row(result, keys: list[str], metric: str,
               budget: Callable[[dict], int]) -> dict[str, Any]:
    """One results-table row from a ``ray.tune.Result``."""
    path = str(result.path or "")
    metrics = result.metrics or {}
    row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or path.rstrip("/").rsplit("/")[-1]}
    config = result.config or {}
    for key in keys:
        row[key] = config.get(key)
    history = result.metrics_dataframe
    if history is None or metric not in getattr(history, "columns", ()):
        history = pd.DataFrame(columns=[metric, "epoch"])
    scored = history[history[metric].notna()]
    row[metric], row["best_epoch"], row["checkpoint"] = math.nan, 0, ""
    if len(scored):
        best = scored.loc[scored[metric].astype(float).idxmax()]
        row[metric], row["best_epoch"] = float(best[metric]), int(best.get("epoch", 0))
        checkpoint = best.get("checkpoint_path")
        if _is_missing(checkpoint) and "checkpoint_path" in scored:
            # the best epoch saved no checkpoint: the best epoch that did
            saved = scored[scored["checkpoint_path"].notna()]
            if len(saved):
                best = saved.loc[saved[metric].astype(float).idxmax()]
                checkpoint = best["checkpoint_path"]
        row["checkpoint"] = "" if _is_missing(checkpoint) else str(checkpoint)
    epochs = history["epoch"].dropna() if "epoch" in history else []
    row["epochs"] = int(max(epochs)) if len(epochs) else 0
    trial_budget = budget({k: config[k] for k in keys if k in config})
    if result.error is not None:
        row["status"] = ERROR
    elif row["epochs"] == 0:
        row["status"] = NOT_RUN
    else:
        row["status"] = COMPLETED if row["epochs"] >= trial_budget else STOPPED
    row["error"] = error_summary(result.error)
    row["path"] = path
    return row


def trial_frame(results: Iterable, keys: list[str], metric: str,
                budget: Callable[[dict], int]) -> pd.DataFrame:
    """The results table of a ``ray.tune.ResultGrid``, best metric first; ``budget(params)``
    is the number of epochs a trial with those parameters runs when not stopped early."""
    rows = [_trial_row(r, keys, metric, budget) for r in results]
    columns = ["trial_id", *keys, metric, "best_epoch", "epochs", "status", "error",
               "checkpoint", "path"]
    frame = pd.DataFrame(rows, columns=columns)
    return sort_frame(frame, metric)


def sort_frame(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best metric first, trials without one last, ties by trial id."""
    return frame.sort_values([metric, "trial_id"], ascending=[False, True],
                             na_position="last").reset_index(drop=True)


def best_trial(frame: pd.DataFrame, metric: str) -> pd.Series | None:
    """The row with the highest metric, or None when no trial reported one."""
    scored = frame[frame[metric].notna()]
    if scored.empty:
        return None
    return sort_frame(scored, metric).iloc[0]


def _fs(path: str):
    from raycmr.data.paths import split_uri

    fs, inner, _ = split_uri(path)
    return fs, inner


def _write_bytes(out_dir: str, name: str, data: bytes) -> str:
    fs, inner = _fs(out_dir)
    fs.create_dir(inner, recursive=True)
    with fs.open_output_stream(f"{inner.rstrip('/')}/{name}") as fh:
        fh.write(data)
    return f"{out_dir.rstrip('/')}/{name}"


def _flat_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()  # numpy scalar -> Python
    return value


def _portable(frame: pd.DataFrame) -> pd.DataFrame:
    """Lists/dicts (from choice entries) as JSON text, so that CSV and Parquet agree."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(_flat_cell)
    return out


def _numeric(values: pd.Series) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in values.map(_flat_cell))


def plot_metric(frame: pd.DataFrame, metric: str, params: list[str],
                log_params: Iterable[str] = ()) -> bytes:
    """A PNG: the metric (each trial's best) against each searched key, coloured by status;
    the best trial ringed. Numeric keys on a linear (or log) axis, others as categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_params = set(log_params)
    params = params or ["trial_id"]
    ncols = min(3, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    scored = frame[frame[metric].notna()]
    best = best_trial(frame, metric)
    for ax, key in zip(axes.flat, params):
        values = scored[key].map(_flat_cell)
        if _numeric(values):
            x = values.astype(float)
            if key in log_params and (x > 0).all():
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            x = values.map(lambda v, labels=labels: labels.index(str(v)))
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        for status, color in STATUS_COLORS.items():
            mask = (scored["status"] == status).to_numpy()
            if mask.any():
                ax.scatter(x[mask], scored[metric][mask], c=color, label=status, s=30)
        if best is not None:
            bx = x[scored["trial_id"] == best["trial_id"]]
            ax.scatter(bx, [best[metric]] * len(bx), s=160, facecolors="none",
                       edgecolors="black", label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(fontsize=8)
    n_err = int((frame["status"] == ERROR).sum()) if "status" in frame else 0
    fig.suptitle(f"{metric} per trial ({len(scored)} scored, {n_err} errored)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(frame: pd.DataFrame, out_dir: str, metric: str, params: list[str],
                 log_params: Iterable[str] = ()) -> dict[str, str]:
    """Write the results table (CSV + Parquet) and the plot into ``out_dir``; their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _portable(frame)
    paths = {"csv": _write_bytes(out_dir, RESULTS_CSV, table.to_csv(index=False).encode())}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf)
    paths["parquet"] = _write_bytes(out_dir, RESULTS_PARQUET, buf.getvalue())
    paths["plot"] = _write_bytes(out_dir, PLOT_PNG, plot_metric(frame, metric, params, log_params))
    return paths


def best_config(cfg: Config, row: pd.Series, params: list[str]) -> Config:
    """The base config with the best trial's parameters; run name and resume point cleared."""
    flat = {key: _flat_cell(row[key]) for key in params}
    flat.update({"train.name": "", "train.resume_from": ""})
    return with_overrides(cfg, flat)


def write_best(cfg: Config, frame: pd.DataFrame, out_dir: str, metric: str,
               params: list[str]) -> dict[str, Any] | None:
    """Write ``best_config.yaml`` and ``best.json`` for the best trial; None when no trial
    reported the metric. Returns the contents of ``best.json``."""
    row = best_trial(frame, metric)
    if row is None:
        return None
    config_path = _write_bytes(out_dir, BEST_CONFIG, best_config(cfg, row, params).to_yaml()
                               .encode())
    best = {
        "trial_id": str(row["trial_id"]), "metric": metric, "value": float(row[metric]),
        "best_epoch": int(row["best_epoch"]), "epochs": int(row["epochs"]),
        "status": str(row["status"]),
        "params": {key: _flat_cell(row[key]) for key in params},
        "checkpoint": str(row["checkpoint"] or ""), "config": config_path,
    }
    _write_bytes(out_dir, BEST_JSON, (json.dumps(best, indent=2) + "\n").encode())
    return best


def format_table(frame: pd.DataFrame, metric: str, params: list[str]) -> str:
    """The results table as text (without the long path columns)."""
    shown = _portable(frame[["trial_id", *params, metric, "best_epoch", "epochs", "status",
                             "error"]])
    shown["error"] = shown["error"].map(lambda e: e if len(e) <= 60 else e[:57] + "...")
    with pd.option_context("display.width", 200, "display.max_columns", None,
                           "display.float_format", "{:.4g}".format):
        return shown.to_string(index=False)
