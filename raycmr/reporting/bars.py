"""A rows counter for long loops (shard writing, gallery embedding): a ``rich`` bar with
rows/s on a terminal; elsewhere (a log, CI) one line every few seconds and one at the end."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RowsBar:
    def __init__(self, label: str, total: int | None = None, *, console: Console | None = None,
                 every_s: float = 5.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.console = console or Console(file=sys.stderr, highlight=False, soft_wrap=True)
        self._start = self._last_line = time.monotonic()
        self._rows, self._extra = 0, ""
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[rate]} rows/s {task.fields[extra]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
                # the process's own prints (Ray's forwarded lines) stay where they were going
                redirect_stdout=False, redirect_stderr=False)
            self._task = self._progress.add_task(label, total=total, rate="-", extra="")
            self._progress.start()

    def rate(self) -> float:
        return self._rows / max(time.monotonic() - self._start, 1e-9)

    def update(self, rows: int, extra: str = "") -> None:
        """``rows`` done so far (absolute); ``extra``: a short note (e.g. "3 rejected")."""
        self._rows, self._extra = rows, extra
        if self._progress is not None:
            self._progress.update(self._task, completed=rows, rate=f"{self.rate():.0f}",
                                  extra=extra)
        elif time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            self.console.print(self._line())

    def _line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        extra = f", {self._extra}" if self._extra else ""
        return f"{self.label}: {self._rows}{of} rows, {self.rate():.0f} rows/s{extra}"

    def close(self) -> None:
        """Stop the bar and leave one line with the totals."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.console.print(self._line() + f" in {time.monotonic() - self._start:.1f} s")
