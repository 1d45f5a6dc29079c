"""A training run as a person sees it: where its log and TensorBoard events go, a progress bar
per epoch, one line per epoch, the final validation table and the checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from raycmr.config import Config
from raycmr.reporting.console import TrainConsole, metrics_table
from raycmr.reporting.tensorboard import TensorBoardSink
from raycmr.train.registry import method, validation_metric
from raycmr.train.run import train
from raycmr.train.trainer import local_run_dir, run_name

LOG_FILE = "raycmr.log"
TENSORBOARD_DIR = "tensorboard"


def run_paths(cfg: Config) -> tuple[str, Path]:
    """(run name, the local folder of its log file and TensorBoard events)."""
    name = run_name(cfg)
    return name, local_run_dir(cfg, name)


def train_on_console(cfg: Config, console: Console, name: str, run_dir: Path,
                     verbose: bool = False):
    """Train with rank 0's progress on ``console`` and TensorBoard events under ``run_dir``;
    returns Ray Train's Result."""
    tensorboard = run_dir / TENSORBOARD_DIR
    console.print(f"run {name}: {cfg.train.num_workers} workers x {cfg.train.epochs} epochs")
    if not verbose:
        console.print(f"  log (Ray, workers): {run_dir / LOG_FILE}   (--verbose shows it here)")
    if not method(cfg.train.task).live_progress:
        console.print(f"  progress lines in {run_dir / LOG_FILE} (no bars for {cfg.train.task})")
        return train(cfg, name=name)
    console.print(f"  tensorboard --logdir {tensorboard}")
    return train(cfg, name=name, sinks=[
        TrainConsole(console, validation_metric(cfg), cfg.train.epochs),
        TensorBoardSink(tensorboard)])


def best_checkpoint(result):
    """The best checkpoint by the validation metric (the latest when nothing ranks them)."""
    return result.best_checkpoints[-1][0] if result.best_checkpoints else result.checkpoint


def print_final(console: Console, result, metric: str) -> None:
    """The last epoch's validation table, the run folder and the checkpoints (the best by
    ``metric`` with its value)."""
    metrics = result.metrics or {}
    if any(k.startswith("val_") for k in metrics):
        console.print()
        console.print(metrics_table(metrics, f"validation after epoch {metrics.get('epoch')}",
                                    prefix="val_"))
    console.print(f"run dir:    {result.path}")
    if result.checkpoint is not None:
        console.print(f"last:       {result.checkpoint.path}")
    if result.best_checkpoints:
        best, best_metrics = result.best_checkpoints[-1]
        value = best_metrics.get(metric)
        console.print(f"best:       {best.path}"
                      + (f"   ({metric} {value:.4f})" if value is not None else ""))
