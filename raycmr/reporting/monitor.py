"""The driver's side of a run's progress: drain the board, hand each update to the sinks."""

from __future__ import annotations

import threading
import warnings
from typing import Any, Protocol

import ray


class Sink(Protocol):
    """Receives a run's updates in order (see :mod:`raycmr.reporting.board`)."""

    def on_update(self, update: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class RunMonitor:
    """A background thread that drains ``board`` every ``interval`` seconds while the run
    trains; leaving the ``with`` block drains what is left and closes the sinks."""

    def __init__(self, board, sinks: list[Sink], interval: float = 0.5) -> None:
        self.board, self.sinks, self.interval = board, sinks, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycmr-monitor", daemon=True)

    def __enter__(self) -> RunMonitor:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # reports that arrived after the thread's last look
        for sink in self.sinks:
            sink.close()
        if self.board is not None:
            ray.kill(self.board)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()

    def _drain(self) -> None:
        """Hand the board's updates to every sink; a failing sink is reported (to the log)
        and skipped, never allowed to stop the run."""
        if self.board is None:
            return
        try:
            updates = ray.get(self.board.drain.remote())
        except ray.exceptions.RayActorError:  # the display is gone; training goes on
            self.board = None
            return
        for update in updates:
            for sink in self.sinks:
                try:
                    sink.on_update(update)
                except Exception as exc:  # noqa: BLE001 - a display must not end training
                    warnings.warn(f"{type(sink).__name__} failed on a {update.get('kind')} "
                                  f"update: {exc!r}", stacklevel=1)
