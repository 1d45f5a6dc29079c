"""jobs/ablate.py's aggregation and table against hand-computed numbers (the job itself is not
run here)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "ablate", Path(__file__).resolve().parents[1] / "jobs" / "ablate.py")
ablate = importlib.util.module_from_spec(_spec)
sys.modules["ablate"] = ablate  # dataclasses look their module up
_spec.loader.exec_module(ablate)

TRIALS = [
    {"row": "mh", "seed": 0, "val_t2i_r1": 20.0, "val_modality_gap": 0.5},
    {"row": "mh", "seed": 1, "val_t2i_r1": 24.0, "val_modality_gap": 0.7},
    {"row": "mh", "seed": 2, "val_t2i_r1": 25.0, "val_modality_gap": 0.6},
    {"row": "sh", "seed": 0, "val_t2i_r1": 10.0},
    {"row": "sh", "seed": 1, "val_t2i_r1": 14.0},
    {"row": "infonce", "seed": 0, "val_t2i_r1": 30.0},
]


def test_mean_spread_by_hand():
    # mean 23; deviations -3, 1, 2 -> squares 9 + 1 + 4 = 14; sample variance 14 / 2 = 7
    assert ablate.mean_spread([20.0, 24.0, 25.0]) == pytest.approx((23.0, math.sqrt(7.0)))
    assert ablate.mean_spread([3.0]) == (3.0, 0.0)
    mean, std = ablate.mean_spread([])
    assert math.isnan(mean) and math.isnan(std)


def test_aggregate_and_table_by_hand():
    stats = ablate.aggregate(TRIALS, ["val_t2i_r1", "val_modality_gap"])
    assert list(stats) == ["mh", "sh", "infonce"]
    assert stats["mh"]["n"] == 3
    assert stats["sh"]["val_t2i_r1"] == pytest.approx((12.0, math.sqrt(8.0)))  # 2^2 + 2^2, /1
    assert stats["mh"]["val_modality_gap"] == pytest.approx((0.6, 0.1))  # 0.01 + 0.01, /2
    assert math.isnan(stats["sh"]["val_modality_gap"][0])  # no trial reported it
    table = ablate.markdown_table(TRIALS, [("val_t2i_r1", "t2i R@1"),
                                           ("val_modality_gap", "gap")], {"mh": "MH"})
    lines = table.splitlines()
    assert lines[0] == "| row | seeds | t2i R@1 | gap |"
    assert lines[2] == "| MH | 3 | 23.0 ± 2.6 | 0.600 ± 0.100 |"
    assert lines[3] == "| sh | 2 | 12.0 ± 2.8 | - |"
    assert ablate.rank_order(TRIALS, "val_t2i_r1") == ["infonce", "mh", "sh"]
