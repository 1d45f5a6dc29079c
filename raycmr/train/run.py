"""`raycmr train`'s entry: a dual encoder run, or DCKT's rounds when ``dckt.enabled``."""

from __future__ import annotations

from raycmr.config import Config


def train(cfg: Config, *, name: str | None = None, sinks: list | None = None):
    """Run training to the end; returns Ray Train's Result (metrics, checkpoint, path), or with
    ``dckt.enabled`` the DCKT rounds' :class:`~raycmr.train.dckt.DCKTResult` (same fields).

    ``sinks`` (console, TensorBoard; see :mod:`raycmr.reporting`) receive rank 0's progress
    and every epoch's report while the run trains."""
    from raycmr.resources import check_cluster_fits, training_demand
    from raycmr.runtime import cluster_storage_path, init_ray
    from raycmr.train.orphans import remove_unregistered_checkpoints

    if cfg.dckt.enabled:
        from raycmr.train.dckt import run_dckt

        return run_dckt(cfg, name=name, sinks=sinks)
    from raycmr.train.trainer import build_trainer

    cluster_storage_path(cfg.train.storage_path, "train.storage_path")  # refuse before Ray starts
    if cfg.loss.distill.enabled:  # a teacher that cannot teach this model stops here, not on a worker
        from raycmr.train.objective import load_teacher

        load_teacher(cfg)
    init_ray(min_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.reserved_cpus)
    check_cluster_fits(training_demand(cfg))
    if cfg.train.task == "slow":
        from raycmr.train.slow_run import build_slow_trainer as builder
    else:
        builder = build_trainer
    if not sinks:
        result = builder(cfg, name=name).fit()
    else:
        from raycmr.reporting.board import start_board
        from raycmr.reporting.monitor import RunMonitor

        board = start_board()
        with RunMonitor(board, sinks):
            result = builder(cfg, name=name, board=board).fit()
    for path in remove_unregistered_checkpoints(result):
        print(f"[raycmr] removed {path}: a checkpoint a failed worker left unregistered")
    return result
