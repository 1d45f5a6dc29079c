"""A training run as a person sees it: where its log and TensorBoard events go, a progress bar
per epoch, one line per epoch, the final validation table and the checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from raycmr.config import Config
from raycmr.reporting.console import TrainConsole, metrics_table
from raycmr.reporting.tensorboard import TensorBoardSink
from raycmr.train.contrastive import anchors_line
from raycmr.train.registry import validation_metric
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
    console.print(f"  tensorboard --logdir {tensorboard}")
    anchors = anchors_line(cfg)
    if anchors:
        console.print(f"  {anchors}")
    epochs = cfg.train.epochs  # DCKT: round 0's source passes, then every round's
    if cfg.train.task == "dckt":
        epochs += cfg.dckt.epochs_per_round * cfg.dckt.rounds
    return train(cfg, name=name, sinks=[
        TrainConsole(console, validation_metric(cfg), epochs), TensorBoardSink(tensorboard)])


def best_checkpoint(result):
    """The best checkpoint by the validation metric (the latest when nothing ranks them)."""
    return result.best_checkpoints[-1][0] if result.best_checkpoints else result.checkpoint


# The slow task's validation: text->image after re-ranking (or slow-only), the fast stage beside.
SLOW_ROWS = (("t2i", "text->image"), ("fast_t2i", "fast stage alone"))


def print_final(console: Console, result, metric: str, slow: bool = False) -> None:
    """The last epoch's validation table, the run folder and the checkpoints (the best by
    ``metric`` with its value)."""
    metrics = result.metrics or {}
    if any(k.startswith("val_") for k in metrics):
        console.print()
        console.print(metrics_table(metrics, f"validation after epoch {metrics.get('epoch')}",
                                    prefix="val_", **({"rows": SLOW_ROWS} if slow else {})))
    console.print(f"run dir:    {result.path}")
    if result.checkpoint is not None:
        console.print(f"last:       {result.checkpoint.path}")
    if result.best_checkpoints:
        best, best_metrics = result.best_checkpoints[-1]
        value = best_metrics.get(metric)
        console.print(f"best:       {best.path}"
                      + (f"   ({metric} {value:.4f})" if value is not None else ""))
