"""The live trial table of `raycmr tune`: what it shows per trial, and its pickling (Tune
stores its callbacks in tuner.pkl)."""

import io
import pickle
from types import SimpleNamespace

from rich.console import Console

from raycmr.tune.live import TrialTable


def _trial(tid, status, epoch, value, margin):
    return SimpleNamespace(trial_id=tid, status=status, config={"loss.margin": margin},
                           last_result={"epoch": epoch, "val_avg_map": value})


def test_table_shows_state_epoch_latest_and_best_metric_and_params():
    table = TrialTable(Console(file=io.StringIO()), "val_avg_map", ["loss.margin"])
    a = _trial("a1", "RUNNING", 1, 0.30, 0.2)
    table.on_trial_result(0, [a], a, {"val_avg_map": 0.30})
    a.last_result = {"epoch": 2, "val_avg_map": 0.25}
    table.on_trial_result(0, [a], a, {"val_avg_map": 0.25})
    b = _trial("b2", "TERMINATED", 4, 0.41, 0.15)
    table.on_trial_result(0, [a, b], b, {"val_avg_map": 0.41})
    buf = io.StringIO()
    Console(file=buf, width=120).print(table.table([a, b]))
    rows = [[c for c in line.split() if c != "│"] for line in buf.getvalue().splitlines()
            if line.strip().startswith(("a1", "b2"))]
    assert rows == [["a1", "RUNNING", "2", "0.25", "0.3", "0.2"],
                    ["b2", "TERMINATED", "4", "0.41", "0.41", "0.15"]]


def test_lines_when_not_a_terminal_and_pickling_drops_the_terminal():
    buf = io.StringIO()
    table = TrialTable(Console(file=buf), "val_avg_map", ["loss.margin"])
    b = _trial("b2", "TERMINATED", 4, 0.41, 0.15)
    table.on_trial_result(0, [b], b, {"val_avg_map": 0.41})
    table.on_step_end(0, [b])  # not a terminal: no live table
    table.on_trial_complete(0, [b], b)
    assert buf.getvalue() == "trial b2 finished: epoch 4, best val_avg_map 0.41\n"
    copy = pickle.loads(pickle.dumps(table))
    assert copy._best == {"b2": 0.41} and copy.console is not table.console
