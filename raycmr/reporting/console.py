"""The console of a command: Ray's and the libraries' chatter to a log file, progress bars,
one summary line per epoch, the result as a small table.

:func:`console_session` points the process's stdout and stderr (file descriptors 1 and 2, so
that Ray's log lines, the lines Ray forwards from workers, C++ warnings and Python warnings all
follow) at a log file and hands back a ``rich`` console on the real terminal; ``verbose`` keeps
everything on the terminal as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Per-step diagnostics that are not loss parts: left out of the epoch line (kept in TensorBoard).
NOT_LOSS_PARTS = {"pos_sim", "hardest_neg_sim"}


def add_verbose_flag(parser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's log lines and the workers' library warnings on the "
                             "console instead of only in the run's log file")


@contextlib.contextmanager
def console_session(log_path: str | Path | None, verbose: bool = False) -> Iterator[Console]:
    """Everything the process and its Ray workers print goes to ``log_path`` (appended);
    yields a console that still reaches the terminal. A Ray cluster started during the
    session is shut down inside it, so that its teardown lines land in the log too.

    When ``sys.stdout`` is an in-memory stream (a test capturing output) the console writes
    to it, and only the file descriptors go to the log."""
    ray_before = _ray_initialized()
    if verbose or log_path is None:
        try:
            yield Console(highlight=False, soft_wrap=True)
        finally:
            if not ray_before:
                _shutdown_ray()
        return
    log_path = Path(log_path)
    # the folders this session creates (the run folder and any missing parents, e.g. runs/)
    created = [d for d in (log_path.parent, *log_path.parent.parents) if not d.exists()]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = sys.stdout if _in_memory(sys.stdout) else \
        os.fdopen(os.dup(saved[0]), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield Console(file=terminal, highlight=False, soft_wrap=True)
    except BaseException:
        if created:  # stopped before anything but the log was written (e.g. a bad setting)
            _remove_if_only(log_path, created)
        raise
    finally:
        if not ray_before:
            _shutdown_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        if terminal is not sys.stdout:
            terminal.close()


def _remove_if_only(log_path: Path, created: list[Path]) -> None:
    """Remove the log and the folders created for it, when nothing else was written there."""
    if [p.name for p in log_path.parent.iterdir()] != [log_path.name]:
        return
    log_path.unlink()
    for folder in created:  # innermost first
        if any(folder.iterdir()):
            return
        folder.rmdir()


def _in_memory(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return True
    return False


def _ray_initialized() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


class TrainConsole:
    """A :class:`~raycmr.reporting.monitor.Sink` for the terminal: a progress bar per epoch
    (step, loss, samples/s, ETA) while it runs, replaced by one summary line when the epoch's
    report arrives (loss parts, validation metric, dropped records, checkpoint)."""

    def __init__(self, console: Console, metric: str, epochs: int, label: str = "epoch") -> None:
        self.console, self.metric, self.epochs, self.label = console, metric, epochs, label
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=True, disable=not console.is_terminal,
            # the process's own prints (Ray's forwarded lines) stay in the log
            redirect_stdout=False, redirect_stderr=False)
        # Until rank 0's first step: an open-ended bar while Ray starts the workers.
        self._task: Any = self._progress.add_task("starting workers", total=None, loss="-",
                                                  rate="-")
        self._task_epoch = -1
        self._progress.start()

    def on_update(self, update: dict[str, Any]) -> None:
        kind = update["kind"]
        if kind == "step":
            self._on_step(update)
        elif kind == "report":
            self._finish_task()
            self.console.print(epoch_line(update["metrics"], update["checkpoint"], self.metric,
                                          self.epochs, self.label))
        elif kind == "note":
            self.console.print(update["text"])

    def _on_step(self, u: dict[str, Any]) -> None:
        if u["epoch"] != self._task_epoch:
            self._finish_task()
            self._task = self._progress.add_task(
                f"{self.label} {u['epoch'] + 1}/{u['epochs']}", total=u["epoch_steps"],
                loss="-", rate="-")
            self._task_epoch = u["epoch"]
        self._progress.update(self._task, completed=u["epoch_step"],
                              loss=_fmt(u["values"].get("loss", float("nan"))),
                              rate=f"{u['samples_per_s']:.0f}")

    def _finish_task(self) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None

    def close(self) -> None:
        self._finish_task()
        self._progress.stop()


def top_loss_parts(parts: dict[str, float]) -> dict[str, float]:
    """The loss parts an epoch line shows: a group with a total (``dscmr_total``) as one part
    (``dscmr``), and no part that refines another (``dscmr_label_img`` beside ``dscmr_label``);
    TensorBoard and the log keep them all."""
    groups = {name[:-len("_total")] for name in parts if name.endswith("_total")}
    shown = {}
    for name, value in parts.items():
        group = next((g for g in groups if name.startswith(g + "_")), None)
        if group is not None:
            if name == f"{group}_total":
                shown[group] = value
        elif not any(name.startswith(other + "_") for other in parts if other != name):
            shown[name] = value
    return shown


def epoch_line(metrics: dict[str, Any], checkpoint: str | None, metric: str, epochs: int,
               label: str = "epoch") -> str:
    """``epoch 3/8  loss 3.91 (contrastive 3.91)  val rsum 212.4  dropped 0  41 s  saved NAME``"""
    parts = [f"{label} {metrics.get('epoch', '?')}/{epochs}"]
    if "train_loss" in metrics:
        shown = top_loss_parts({k[6:]: v for k, v in metrics.items()
                                if k.startswith("train_") and k != "train_loss"
                                and k[6:] not in NOT_LOSS_PARTS and isinstance(v, (int, float))})
        extra = [f"{name} {_fmt(v)}" for name, v in sorted(shown.items())]
        parts.append(f"loss {_fmt(metrics['train_loss'])}"
                     + (f" ({', '.join(extra)})" if extra else ""))
    if metric in metrics:
        value = metrics[metric]
        parts.append(f"{metric.replace('_', ' ', 1)} {value:.1f}" if abs(value) >= 10
                     else f"{metric.replace('_', ' ', 1)} {value:.4f}")
    parts.append(f"dropped {int(metrics.get('dropped_records', 0))}")
    if "epoch_time_s" in metrics:
        parts.append(f"{metrics['epoch_time_s']:.0f} s")
    if checkpoint:
        parts.append(f"saved {Path(checkpoint).name}")
    return "  ".join(parts)


def metrics_table(metrics: dict[str, float], title: str, prefix: str = "",
                  rows: tuple[tuple[str, str], ...] = (("i2t", "image->text"),
                                                      ("t2i", "text->image"))) -> Table:
    """R@1/5/10, medr, meanr (and mAP when present) as a small table: one row per
    ``(key, label)`` of ``rows`` that has figures (``{prefix}{key}_r1``, ...), one column per
    figure some row has."""
    rows = tuple((key, label) for key, label in rows
                 if any(k.startswith(f"{prefix}{key}_") for k in metrics))
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("direction")
    columns = [(name, key, spec) for name, key, spec in (
        ("R@1", "r1", ".1f"), ("R@5", "r5", ".1f"), ("R@10", "r10", ".1f"),
        ("medr", "medr", ".0f"), ("meanr", "meanr", ".1f"), ("mAP", "map", ".4f"))
        if any(f"{prefix}{direction}_{key}" in metrics for direction, _ in rows)]
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    for direction, label in rows:
        row = [label]
        for _, key, spec in columns:
            value = metrics.get(f"{prefix}{direction}_{key}")
            row.append("-" if value is None else format(value, spec))
        table.add_row(*row)
    return table


def group_accuracy_line(metrics: dict[str, float], prefix: str = "") -> str | None:
    """One line of minimal-pair group accuracy (overall and per kind of swap, each beside its
    chance level), or None when ``metrics`` has none."""
    if f"{prefix}group_acc" not in metrics:
        return None
    kinds = sorted(k[len(prefix) + len("group_acc_"):] for k in metrics
                   if k.startswith(f"{prefix}group_acc_"))
    names = ["", *(f"_{k}" for k in kinds)]
    parts = [f"{k.lstrip('_') or 'all'} {metrics[f'{prefix}group_acc{k}']:.1f}% "
             f"(chance {metrics[f'{prefix}group_chance{k}']:.1f}%)" for k in names]
    return (f"minimal-pair group accuracy ({int(metrics[f'{prefix}group_captions'])} captions; "
            "own image above every other image of its group): " + ", ".join(parts))
