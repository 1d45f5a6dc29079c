"""TensorBoard event files of a run, written on the driver from the board's updates.

Tags (x axis: the optimizer step):

* ``train/<part>``: every ``train.log_every`` steps, rank 0's loss parts of that step
  (``loss``, ``contrastive``, ``adversary``, ``dscmr_*``, ``distill``, ...), ``lr``,
  ``grl_lambda``, ``disc_acc`` (with the GRL adversary) and ``samples_per_s``;
* ``val/<metric>``: each epoch's validation metrics (``val/rsum``, ``val/t2i_r1``, ...);
* ``epoch/<metric>``: each epoch's other numbers (mean training losses over both ranks,
  ``lr``, ``samples_per_s``, ``dropped_records``, ``epoch_time_s``).

Read them with ``tensorboard --logdir DIR`` or TensorBoard's ``EventAccumulator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOT_SCALARS = {"epoch", "step"}


class TensorBoardSink:
    """Writes the board's updates as TensorBoard scalars; the event file is created with the
    first update, so a run stopped by a check before training leaves no folder behind."""

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._opened: Any = None

    @property
    def _writer(self) -> Any:
        if self._opened is None:
            from torch.utils.tensorboard import SummaryWriter

            self._opened = SummaryWriter(str(self.logdir))
        return self._opened

    def on_update(self, update: dict[str, Any]) -> None:
        if update["kind"] == "step":
            for name, value in update["values"].items():
                self._writer.add_scalar(f"train/{name}", value, update["step"],
                                        walltime=update["time"])
            self._writer.add_scalar("train/samples_per_s", update["samples_per_s"],
                                    update["step"], walltime=update["time"])
        elif update["kind"] == "report":
            metrics = update["metrics"]
            step = int(metrics.get("step", 0))
            for name, value in sorted(metrics.items()):
                if name in NOT_SCALARS or isinstance(value, bool) \
                        or not isinstance(value, (int, float)):
                    continue
                tag = f"val/{name[4:]}" if name.startswith("val_") else f"epoch/{name}"
                self._writer.add_scalar(tag, value, step, walltime=update["time"])
        self._writer.flush()

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()
