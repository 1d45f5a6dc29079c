"""The per-worker loop's parts on plain values: fixed step counts and the epoch's reduction."""

from __future__ import annotations

import pytest

from raycmr.train.loop import STEP_PHASES, FixedSteps, WorkerEpoch, epoch_metrics


def test_fixed_steps_repeats_the_last_item_and_counts_it():
    steps = FixedSteps(iter("ab"), 5)
    assert list(steps) == ["a", "b", "b", "b", "b"] and steps.repeated == 3
    exact = FixedSteps(range(10), 4)
    assert list(exact) == [0, 1, 2, 3] and exact.repeated == 0
    with pytest.raises(ValueError, match="no valid batch"):
        list(FixedSteps([], 1))


def test_epoch_metrics_average_per_micro_step_then_over_workers():
    a, b = WorkerEpoch(), WorkerEpoch()
    a.add({"loss": 1.0}, rows=4)
    a.add({"loss": 3.0}, rows=4)  # mean 2
    b.add({"loss": 5.0, "extra": 2.0}, rows=3)  # mean 5
    a.repeated, b.repeated = 1, 2
    a.seconds = {"forward": 0.2, "first_batch": 1.0}  # 100 ms per micro-step
    b.seconds = {"forward": 0.3, "first_batch": 3.0}  # 300 ms
    m = epoch_metrics([a, b])
    assert m["train_loss"] == pytest.approx((2.0 + 5.0) / 2)
    assert m["train_extra"] == pytest.approx((0.0 + 2.0) / 2)
    assert m["repeated_batches"] == 3 and (a.rows, b.rows) == (8, 3)
    assert m["step_ms_forward"] == pytest.approx(200.0) and m["first_batch_s"] == pytest.approx(2.0)
    assert {f"step_ms_{p}" for p in STEP_PHASES} <= set(m) and m["step_ms_data"] == 0.0
