"""jobs/grl_search.py's choice on validation and its two-standard-error difference, against
hand-made trials (the job itself is not run here)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_jobs = Path(__file__).resolve().parents[1] / "jobs"
sys.path.insert(0, str(_jobs))
_spec = importlib.util.spec_from_file_location("grl_search", _jobs / "grl_search.py")
grl_search = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grl_search)


def test_choose_prefers_the_best_trial_whose_discriminator_is_near_chance():
    trials = [
        {"epochs": 12, "val_avg_map": 0.25, "train_disc_acc": 0.9},   # best mAP, acc out of range
        {"epochs": 12, "val_avg_map": 0.22, "train_disc_acc": 0.55},
        {"epochs": 12, "val_avg_map": 0.23, "train_disc_acc": 0.41},  # the chosen one
        {"epochs": 4, "val_avg_map": 0.30, "train_disc_acc": 0.5},    # stopped early by ASHA
    ]
    assert grl_search.choose(trials, 12) == (trials[2], True)
    # none in range: the best full-length trial, flagged
    assert grl_search.choose(trials[:1] + trials[3:], 12) == (trials[0], False)
    with pytest.raises(ValueError, match="no search trial ran every epoch"):
        grl_search.choose(trials[3:], 12)
    # in range at any length: the early-stopped 0.30 one; none in range: None
    assert grl_search.near_chance(trials) is trials[3]
    assert grl_search.near_chance(trials[:1]) is None


def test_difference_and_two_standard_errors_by_hand():
    # means 3 and 1; sample variances 1 (2, 3, 4) and 4 (-1, 1, 3): 2 * sqrt(1/3 + 4/3)
    d, e = grl_search.difference([2.0, 3.0, 4.0], [-1.0, 1.0, 3.0])
    assert d == pytest.approx(2.0) and e == pytest.approx(2 * math.sqrt(5 / 3))
