"""The console without Ray: what reaches the terminal and what the log file, the epoch lines,
the result table."""

import io
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console

from raycmr.reporting.console import TrainConsole, epoch_line, metrics_table


def test_console_session_sends_process_output_to_the_log(tmp_path):
    """Everything written to fds 1/2 (Python prints, warnings, a C-level write, a child
    process) lands in the log; only the console's own lines reach the terminal."""
    log = tmp_path / "run" / "raycmr.log"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, warnings
        from raycmr.reporting.console import console_session
        with console_session({str(log)!r}) as console:
            console.print("for the person")
            print("python stdout")
            print("python stderr", file=sys.stderr)
            warnings.warn("a library warning")
            os.write(1, b"fd one\\n")
            subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
        print("after the session")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.splitlines() == ["for the person", "after the session"]
    assert out.stderr == ""
    text = log.read_text()
    for line in ("python stdout", "python stderr", "a library warning", "fd one",
                 "child process"):
        assert line in text
    assert "for the person" not in text

    verbose = subprocess.run(
        [sys.executable, "-c", script.replace(f"console_session({str(log)!r})",
                                              f"console_session({str(log)!r}, verbose=True)")],
        capture_output=True, text=True, check=True)
    assert "python stdout" in verbose.stdout and "a library warning" in verbose.stderr


def _render(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=120, highlight=False).print(renderable)
    return buf.getvalue()


def test_epoch_line_shows_loss_parts_metric_dropped_and_checkpoint():
    metrics = {"epoch": 3, "step": 93, "train_loss": 3.91234, "train_contrastive": 3.5,
               "train_adversary": 0.69314, "train_pos_sim": 0.4, "train_hardest_neg_sim": 0.3,
               "val_rsum": 212.44, "dropped_records": 7, "epoch_time_s": 41.4}
    line = epoch_line(metrics, "/runs/x/checkpoint_2026-01-01_00-00-00.1", "val_rsum", 8)
    assert line == ("epoch 3/8  loss 3.912 (adversary 0.6931, contrastive 3.5)  val rsum 212.4  "
                    "dropped 7  41 s  saved checkpoint_2026-01-01_00-00-00.1")


def test_epoch_line_shows_a_group_by_its_total_and_no_refinements():
    """DSCMR's eight parts come as one (its total); a part refining another is left out."""
    parts = {"contrastive": 0.8842, "dscmr_common": 2.386, "dscmr_common_ii": 0.8017,
             "dscmr_label": 2.044, "dscmr_label_img": 1.016, "dscmr_total": 4.538,
             "mmd": 0.5, "mmd_rbf": 0.25}
    metrics = {"epoch": 1, "train_loss": 4.582, **{f"train_{k}": v for k, v in parts.items()}}
    line = epoch_line(metrics, None, "val_avg_map", 60)
    assert line == "epoch 1/60  loss 4.582 (contrastive 0.8842, dscmr 4.538, mmd 0.5)  dropped 0"


def test_train_console_prints_one_line_per_epoch_report():
    buf = io.StringIO()
    sink = TrainConsole(Console(file=buf, width=200), "val_avg_map", epochs=2)
    step = {"kind": "step", "epoch": 0, "epochs": 2, "step": 5, "total_steps": 20,
            "epoch_step": 5, "epoch_steps": 10, "samples_per_s": 100.0, "values": {"loss": 1.0}}
    for epoch in (0, 1):
        sink.on_update({**step, "epoch": epoch})
        sink.on_update({"kind": "report", "checkpoint": None,
                        "metrics": {"epoch": epoch + 1, "train_loss": 2.0 - epoch,
                                    "val_avg_map": 0.25 + epoch / 10, "dropped_records": 0}})
    sink.on_update({"kind": "note", "text": "resumed at epoch 2, step 10"})
    sink.close()
    # not a terminal: no bars, only the lines
    assert buf.getvalue().splitlines() == [
        "epoch 1/2  loss 2  val avg_map 0.2500  dropped 0",
        "epoch 2/2  loss 1  val avg_map 0.3500  dropped 0",
        "resumed at epoch 2, step 10"]


def test_metrics_table_holds_recall_ranks_and_map():
    metrics = {"i2t_r1": 10.0, "i2t_r5": 30.25, "i2t_r10": 45.0, "i2t_medr": 12.0,
               "i2t_meanr": 40.5, "t2i_r1": 11.0, "t2i_r5": 31.0, "t2i_r10": 46.0,
               "t2i_medr": 11.0, "t2i_meanr": 39.25, "i2t_map": 0.31, "t2i_map": 0.2306}
    text = _render(metrics_table(metrics, "test"))
    rows = [line.split() for line in text.splitlines() if "->" in line]
    assert [r for r in rows[0] if r != "│"] == ["image->text", "10.0", "30.2", "45.0", "12",
                                                "40.5", "0.3100"]
    assert [r for r in rows[1] if r != "│"] == ["text->image", "11.0", "31.0", "46.0", "11",
                                                "39.2", "0.2306"]
    only_map = _render(metrics_table({"i2t_map": 0.3, "t2i_map": 0.2}, "wiki"))
    assert "R@1" not in only_map and "0.3000" in only_map


def test_metrics_table_of_the_slow_task_has_its_figures():
    """The slow task reports text->image only (and the fast stage beside it): no empty rows."""
    from raycmr.train.session import SLOW_ROWS

    metrics = {"val_t2i_r1": 76.4, "val_t2i_r5": 89.0, "val_t2i_r10": 91.8, "val_t2i_medr": 1.0,
               "val_fast_t2i_r1": 23.2, "val_fast_t2i_r5": 58.0, "val_fast_t2i_r10": 80.0,
               "val_fast_t2i_medr": 4.0, "val_fast_recall_at_k": 92.0}
    text = _render(metrics_table(metrics, "val", prefix="val_", rows=SLOW_ROWS))
    rows = [[c for c in line.split() if c != "│"] for line in text.splitlines()
            if "text->image" in line or "fast stage" in line]
    assert rows == [["text->image", "76.4", "89.0", "91.8", "1"],
                    ["fast", "stage", "alone", "23.2", "58.0", "80.0", "4"]]


def test_console_session_stopped_by_an_error_leaves_no_empty_folder(tmp_path):
    from raycmr.reporting.console import console_session

    with pytest.raises(ValueError), console_session(tmp_path / "run" / "raycmr.log"):
        raise ValueError("a bad setting")
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError), console_session(tmp_path / "kept" / "raycmr.log"):
        raise ValueError("a bad setting")
    assert (tmp_path / "kept" / "raycmr.log").exists()  # the folder was there before


def test_bars_leave_the_process_prints_where_they_were_going(capsys):
    """While a bar is drawn, Ray's forwarded lines (plain prints on the driver) must not be
    pulled onto the terminal above it (rich redirects sys.stdout by default)."""
    from raycmr.reporting.bars import RowsBar

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    sink = TrainConsole(console, "val_rsum", epochs=1)
    bar = RowsBar("rows", 10, console=console)
    print("a line ray forwarded")
    bar.close()
    sink.close()
    assert "a line ray forwarded" in capsys.readouterr().out
    assert "a line ray forwarded" not in buf.getvalue()
