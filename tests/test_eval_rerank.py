"""`raycmr eval --checkpoint FAST --rerank SLOW` end to end on exported checkpoints (Ray Data
decodes the split): rows that must agree with each other by construction."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from raycmr.artifacts import write_export
from raycmr.cli import main
from raycmr.config import load_config
from raycmr.configs.tiny import TINY_SLOW, TINY_TOWERS
from raycmr.data.synthetic import write_minimal_pairs, write_synthetic_splits
from raycmr.models.dual_encoder import DualEncoder
from raycmr.models.slow import build_slow_model

pytestmark = pytest.mark.ray


def _cfg(shards, task: str):
    return load_config("quickstart_slow" if task == "slow" else "quickstart", [
        f"data.train=[{shards}/train]", f"data.val=[{shards}/val]", f"data.test=[{shards}/test]",
        "data.image_size=32", "data.max_text_len=16", *TINY_SLOW, "model.embed_dim=16",
        *TINY_TOWERS,
    ])


def test_eval_rerank_rows_agree(ray_cluster, tmp_path, capsys):
    shards = tmp_path / "shards"
    write_synthetic_splits(shards, n_train=8, n_val=8, n_test=30, seed=2, image_size=32)
    torch.manual_seed(0)
    fast_dir, slow_dir = tmp_path / "fast", tmp_path / "slow"
    fast_dir.mkdir()
    slow_dir.mkdir()
    fast_cfg, slow_cfg = _cfg(shards, "dual_encoder"), _cfg(shards, "slow")
    write_export(fast_dir, DualEncoder(fast_cfg.model).state_dict(), fast_cfg, {})
    slow = build_slow_model(slow_cfg.slow, torch.arange(1000, 3000), 32, 16)
    write_export(slow_dir, slow.state_dict(), slow_cfg, {})

    out = tmp_path / "rows.json"
    code = main(["eval", "--checkpoint", str(fast_dir), "--rerank", str(slow_dir),
                 "--rerank-k", "1", "5", "0", "--slow-queries", "30", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| fast+slow | 5 |" in printed and "30 images" in printed
    rows = json.loads(out.read_text())
    by = {(r["method"], r["k"]): r for r in rows}
    fast, slow_only = by[("fast", "")], by[("slow-only", 30)]
    # K = 1 keeps the fast ranking; K = every image with beta 0 is the slow-only ranking
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr"):
        assert by[("fast+slow", 1)][key] == fast[key], key
        assert by[("fast+slow", 30)][key] == slow_only[key], key
    assert by[("fast+slow", 5)]["fast_recall_at_k"] == fast["t2i_r5"]
    assert by[("fast+slow", 30)]["fast_recall_at_k"] == 100.0

    # a dual encoder checkpoint given as the slow model: one line naming the problem
    assert main(["eval", "--checkpoint", str(fast_dir), "--rerank", str(fast_dir)]) == 2
    assert "not a slow model" in capsys.readouterr().err

    # minimal-pair shards: group accuracy per method and kind of swap, in the table too
    write_minimal_pairs(tmp_path / "mp", 6, seed=3, image_size=32, progress=False)
    n = pq.read_table(tmp_path / "mp").num_rows
    code = main(["eval", "--checkpoint", str(fast_dir), "--rerank", str(slow_dir),
                 "--rerank-k", "1", "0", "--slow-queries", "4", "--json", str(out),
                 f"data.test=[{tmp_path / 'mp'}]"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| group acc | colour | position | shape |" in printed
    by = {(r["method"], r["k"]): r for r in json.loads(out.read_text())}
    fast, slow_only = by[("fast", "")], by[("slow-only", n)]
    assert slow_only["queries"] == 4 and slow_only["group_captions"] == n
    # K = 1 never reorders a group's images; K = every image with beta 0 is slow-only's order
    for key in ("group_acc", "group_acc_colour", "group_acc_shape", "group_acc_position",
                "group_chance"):
        assert by[("fast+slow", 1)][key] == fast[key], key
        assert by[("fast+slow", n)][key] == slow_only[key], key
