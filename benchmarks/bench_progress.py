"""What rank 0's progress updates cost a training step, side by side.

A Ray actor (a process like a Ray Train worker) runs training steps of a small MLP dual
encoder on random features (forward, backward, AdamW; 1 torch thread) in rounds that alternate
two arms:

* ``silent``: the step alone;
* ``push_every_step``: the step plus ``WorkerProgress.step`` (a fire-and-forget
  ``ProgressBoard.push.remote`` of a step update), sent after *every* step: 10x more often
  than the shipped ``train.log_every: 10``, so the worst case.

A driver thread drains the board twice a second, as ``RunMonitor`` does. Figures are medians of
per-round milliseconds per step; ``x_silent`` = arm / silent (1.00 = no cost).

    python benchmarks/bench_progress.py --small    # 8 rounds of 50 steps
    python benchmarks/bench_progress.py            # 20 rounds of 100 steps
"""

from __future__ import annotations

import argparse
import statistics
import sys

try:
    from benchmarks.common import print_table, write_result
except ImportError:
    from common import print_table, write_result


def _actor_class():
    import ray

    @ray.remote(num_cpus=1)
    class Stepper:
        def __init__(self, board) -> None:
            import torch

            from raycmr.reporting.board import WorkerProgress

            torch.set_num_threads(1)
            torch.manual_seed(0)
            self.torch = torch
            self.model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                             torch.nn.Linear(512, 128))
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
            self.x = torch.randn(128, 512)
            self.progress = WorkerProgress(board, rank=0)

        def run(self, steps: int, push: bool) -> float:
            import time

            torch = self.torch
            start = time.perf_counter()
            for step in range(steps):
                emb = torch.nn.functional.normalize(self.model(self.x), dim=1)
                loss = torch.nn.functional.cross_entropy(emb @ emb.t() / 0.07,
                                                         torch.arange(emb.shape[0]))
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                if push:
                    self.progress.step(
                        epoch=0, epochs=1, step=step + 1, total_steps=steps,
                        epoch_step=step + 1, epoch_steps=steps, samples_per_s=0.0,
                        values={"loss": float(loss.detach()), "lr": 1e-3, "grl_lambda": 0.0})
            return (time.perf_counter() - start) / steps * 1000.0

    return Stepper


def main(argv: list[str] | None = None) -> int:
    import ray

    from raycmr.reporting.board import start_board
    from raycmr.reporting.monitor import RunMonitor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    rounds, steps = (8, 50) if args.small else (20, 100)

    class Count:
        received = 0

        def on_update(self, update):
            Count.received += 1

        def close(self):
            pass

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    board = start_board()
    stepper = _actor_class().remote(board)
    ray.get(stepper.run.remote(steps, False))  # warm-up
    times: dict[str, list[float]] = {"silent": [], "push_every_step": []}
    with RunMonitor(board, [Count()]):
        for _ in range(rounds):
            times["silent"].append(ray.get(stepper.run.remote(steps, False)))
            times["push_every_step"].append(ray.get(stepper.run.remote(steps, True)))
    ratios = [p / s for p, s in zip(times["push_every_step"], times["silent"])]
    rows = [{"arm": arm, "ms_per_step": statistics.median(t),
             "x_silent": 1.0 if arm == "silent" else statistics.median(ratios)}
            for arm, t in times.items()]
    ray.shutdown()
    title = f"progress updates: {rounds} rounds x {steps} steps, updates received {Count.received}"
    print_table(rows, ["arm", "ms_per_step", "x_silent"], title=title,
                formats={"ms_per_step": ".2f", "x_silent": ".3f"})
    write_result("bench_progress", rows, meta={"rounds": rounds, "steps": steps,
                                               "updates_received": Count.received})
    return 0


if __name__ == "__main__":
    sys.exit(main())
