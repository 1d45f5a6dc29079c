"""Carrying a training run's progress from the workers to the driver.

A :class:`ProgressBoard` is a tiny Ray actor (no CPU reserved) holding a list of updates:

* rank 0 pushes a ``step`` update every ``train.log_every`` optimizer steps (fire and forget:
  the worker never waits on it) and ``note`` lines (e.g. "resumed at epoch 3");
* :class:`BoardCallback`, a Ray Train ``UserCallback`` on the run's controller, pushes each
  epoch's ``report`` (rank 0's metrics and the persisted checkpoint's path);
* the driver's :class:`~raycmr.reporting.monitor.RunMonitor` drains the board twice a second
  and hands the updates to the console and the TensorBoard writer.

Workers therefore print nothing per step; the driver decides what a person sees.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ray
from ray.train import UserCallback


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Updates in arrival order; ``drain`` hands them over and forgets them."""

    def __init__(self) -> None:
        self._updates: list[dict[str, Any]] = []

    def push(self, update: dict[str, Any]) -> None:
        self._updates.append(update)

    def drain(self) -> list[dict[str, Any]]:
        out, self._updates = self._updates, []
        return out


def start_board():
    """A new board actor (Ray must be initialised), pinned to the driver's node: on any other
    node, losing that node would lose the board and, with it, the run."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressBoard.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()


class WorkerProgress:
    """Rank 0's side: pushes step updates and notes to the board; a no-op on other ranks and
    when the run has no board (e.g. a bare TorchTrainer in a benchmark)."""

    def __init__(self, board, rank: int) -> None:
        self._board = board if rank == 0 else None

    @property
    def active(self) -> bool:
        return self._board is not None

    def step(self, *, epoch: int, epochs: int, step: int, total_steps: int, epoch_step: int,
             epoch_steps: int, samples_per_s: float, values: dict[str, float]) -> None:
        """``values``: this step's loss parts plus lr, grl_lambda (and disc_acc with GRL)."""
        if self._board is None:
            return
        self._board.push.remote({
            "kind": "step", "time": time.time(), "epoch": epoch, "epochs": epochs, "step": step,
            "total_steps": total_steps, "epoch_step": epoch_step, "epoch_steps": epoch_steps,
            "samples_per_s": samples_per_s, "values": values})

    def note(self, text: str) -> None:
        if self._board is not None:
            self._board.push.remote({"kind": "note", "time": time.time(), "text": text})


class BoardCallback(UserCallback):
    """Ray Train callback (runs on the controller): every report, rank 0's metrics and the
    persisted checkpoint go to the board. Waits for the push, so that a report is on the board
    before ``fit()`` returns."""

    def __init__(self, board) -> None:
        self._board = board

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if self._board is None:
            return
        try:
            ray.get(self._board.push.remote({
                "kind": "report", "time": time.time(),
                "metrics": dict(metrics[0]) if metrics else {},
                "checkpoint": checkpoint.path if checkpoint is not None else None}))
        except ray.exceptions.RayActorError:  # the display is gone; training goes on
            self._board = None


def worker_print(text: str) -> None:
    """Print one line from a Ray Train worker so that it reaches the driver once.

    Train V2 replaces ``print`` in its workers by a function that logs the line through its
    logger *and*, because Ray wraps the worker's ``sys.stdout``, prints it as well: a plain
    ``print`` shows up twice on the driver. Writing to the process's own stdout bypasses both.
    """
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()
