"""``loss.anchors`` says at the start of a run which anchors it chose: one console line on the
driver, before Ray starts."""

import io

import pytest
from rich.console import Console

from raycmr.config import ConfigError, load_config
from raycmr.losses.batch import explain_anchors
from raycmr.train.contrastive import anchors_line
from raycmr.train.session import train_on_console


@pytest.mark.parametrize("mode, world, line", [
    ("auto", 1, "global (auto: 1 worker <= 2)"),
    ("auto", 2, "global (auto: 2 workers <= 2)"),
    ("auto", 3, "local (auto: 3 workers > 2)"),
    ("auto", 256, "local (auto: 256 workers > 2)"),
    ("global", 8, "global (loss.anchors=global)"),
    ("local", 2, "local (loss.anchors=local)"),
])
def test_explain_anchors(mode, world, line):
    assert explain_anchors(mode, world) == line


@pytest.mark.parametrize("overrides", [
    ["loss.kind=none"], ["loss.global_negatives=false"],
    ["train.task=slow", "data.kind=images"],
])
def test_no_line_without_a_gathered_contrastive_loss(overrides):
    assert anchors_line(load_config(None, overrides)) is None


def test_the_run_prints_the_choice_before_ray_starts(tmp_path, monkeypatch):
    """``raycmr train``'s console: the line comes with the run's header, before anything
    starts (here the run then stops at a relative storage path on a cluster, before Ray)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    cfg = load_config(None, ["train.num_workers=3", "train.storage_path=relative/runs"])
    out = io.StringIO()
    with pytest.raises(ConfigError, match="train.storage_path='relative/runs' is relative"):
        train_on_console(cfg, Console(file=out, width=200), "run", tmp_path)
    assert "  loss anchors: local (auto: 3 workers > 2)\n" in out.getvalue()
