"""A live table of a search's trials on the terminal (a Ray Tune callback on the driver):
trial, state, epoch, the validation metric (latest and best) and the trial's parameters.
Elsewhere (a log, CI) one line per finished trial."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialTable(Callback):
    def __init__(self, console: Console, metric: str, params: list[str],
                 refresh_s: float = 1.0) -> None:
        self.console, self.metric, self.params, self.refresh_s = console, metric, params, refresh_s
        self._best: dict[str, float] = {}
        self._live: Live | None = None
        self._last = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (tuner.pkl): the terminal stays out of it
        return {**self.__dict__, "console": None, "_live": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.console = Console(highlight=False, soft_wrap=True)

    def table(self, trials: list) -> Table:
        table = Table(show_edge=False, pad_edge=False)
        for name in ("trial", "state", "epoch", self.metric, "best", *self.params):
            table.add_column(name.replace("loss.", "") if name in self.params else name,
                             justify="left" if name in ("trial", "state") else "right")
        for trial in trials:
            last = trial.last_result or {}
            row = [trial.trial_id, trial.status, _short(last.get("epoch", "-")),
                   _short(last.get(self.metric, "-")),
                   _short(self._best.get(trial.trial_id, "-"))]
            row += [_short(trial.config.get(p, "-")) for p in self.params]
            table.add_row(*row)
        return table

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)):
            self._best[trial.trial_id] = max(self._best.get(trial.trial_id, value), value)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._line(trial, "failed")

    def _line(self, trial, what: str) -> None:
        if self._live is None:  # not a terminal: the table is not drawn, say it in a line
            best = self._best.get(trial.trial_id)
            self.console.print(f"trial {trial.trial_id} {what}: epoch "
                               f"{(trial.last_result or {}).get('epoch', '-')}, best "
                               f"{self.metric} {_short(best) if best is not None else '-'}")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if not self.console.is_terminal:
            return
        now = time.monotonic()
        if self._live is None:
            self._live = Live(self.table(trials), console=self.console, transient=True,
                              redirect_stdout=False, redirect_stderr=False,
                              auto_refresh=False)
            self._live.start()
        if now - self._last >= self.refresh_s:
            self._last = now
            self._live.update(self.table(trials), refresh=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
