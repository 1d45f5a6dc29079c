"""`raycmr train`'s entry: the one dispatch on ``train.task`` to its method's driver."""

from __future__ import annotations

from raycmr.config import Config


def train(cfg: Config, *, name: str | None = None, sinks: list | None = None):
    """Run training to the end; returns Ray Train's Result (metrics, checkpoint, path), or for
    DCKT the rounds' :class:`~raycmr.train.dckt.rounds.DCKTResult` (same fields).

    ``sinks`` (console, TensorBoard; see :mod:`raycmr.reporting`) receive rank 0's progress
    and every epoch's report while the run trains."""
    from raycmr.runtime import cluster_storage_path
    from raycmr.train.registry import load, method

    run = load(method(cfg.train.task).driver)
    cluster_storage_path(cfg.train.storage_path, "train.storage_path")  # refuse before Ray starts
    if not sinks:
        return run(cfg, name=name, board=None)
    from raycmr.reporting.board import start_board
    from raycmr.reporting.monitor import RunMonitor

    board = start_board()
    with RunMonitor(board, sinks):
        return run(cfg, name=name, board=board)
