"""Ray Tune over whole training runs: space parsing and checks, the results writer, ASHA state
rebuilt on resume, and one real experiment on a local Ray cluster -- 3 trials of a 1-worker
TorchTrainer on tiny feature shards, 2 at a time, ASHA stopping the weak one; killed once a
trial has finished, resumed with `raycmr tune --resume`, its best config trained again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raycmr.config import ConfigError, load_config
from raycmr.tune import report
from raycmr.tune.spaces import DEFAULT_SPACE, check_search, default_space, param_space, parse_space

N_CLASSES, IMG_DIM, TXT_DIM = 4, 16, 8
EPOCHS = 2  # ASHA rungs at epoch 1 (grace) and 2 (the budget)
# Grid order is trial order: two learning rates that learn, then one that cannot, so that ASHA
# (grace 1, reduction 2) has good values recorded at epoch 1 when the weak trial gets there (it
# starts once a good one has finished, 2 at a time: after the kill, from the resumed rungs).
LRS = [1e-2, 5e-3, 1e-7]


# ----------------------------------------------------------------------------- space parsing


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_space_parses_every_kind_and_nested_keys():
    cfg = _cfg()
    specs = parse_space(cfg, {
        "loss.margin": {"loguniform": [0.05, 0.5]},
        "loss": {"dscmr": {"alpha": {"uniform": [0.01, 1]}}, "kind": {"choice": ["vse_mh",
                                                                                "infonce"]}},
        "train.lr": {"grid": [1e-3, 3e-4]},
        "train.batch_size": {"uniform": [16, 64]},
    })
    assert {k: (s.kind, s.args) for k, s in specs.items()} == {
        "loss.margin": ("loguniform", (0.05, 0.5)),
        "loss.dscmr.alpha": ("uniform", (0.01, 1)),
        "loss.kind": ("choice", ("vse_mh", "infonce")),
        "train.lr": ("grid", (1e-3, 3e-4)),
        "train.batch_size": ("uniform", (16, 64)),
    }
    space = param_space(cfg, specs)
    assert space["train.lr"] == {"grid_search": [1e-3, 3e-4]}
    rng = np.random.default_rng(0)
    batch = space["train.batch_size"].sample(size=200, random_state=rng)
    assert all(isinstance(b, (int, np.integer)) for b in batch)  # integer key -> integers
    assert min(batch) >= 16 and max(batch) <= 64 and 64 in batch  # upper bound inclusive
    margins = np.array(space["loss.margin"].sample(size=500, random_state=rng))
    assert margins.min() >= 0.05 and margins.max() <= 0.5
    assert np.median(margins) < 0.2  # log-uniform: median near sqrt(0.05 * 0.5) = 0.158


def test_space_from_yaml_overrides():
    cfg = _cfg("tune.space={loss.margin: {uniform: [0.1, 0.3]}}",
               "tune.space.train.lr={grid: [0.001]}")
    assert set(parse_space(cfg)) == {"loss.margin", "train.lr"}


@pytest.mark.parametrize("raw, needle", [
    ({"loss.margn": {"uniform": [0.1, 0.2]}}, "'loss.margn'.*did you mean 'loss.margin'"),
    ({"loss.nothing.at.all": {"uniform": [0.1, 0.2]}}, "'loss.nothing.at.all' is not a config"),
    ({"loss.grl": {"uniform": [0.1, 0.2]}}, "'loss.grl' is a config section"),
    ({"tune.num_samples": {"grid": [1, 2]}}, "'tune.num_samples' cannot be searched"),
    ({"loss.margin": {"normal": [0.1, 0.2]}}, r"tune.space\['loss.margin'\] must be one of"),
    ({"loss.margin": {"uniform": [0.3, 0.1]}}, "low < high"),
    ({"loss.margin": {"loguniform": [0, 0.1]}}, "low > 0"),
    ({"loss.margin": {"uniform": [-0.2, 0.1]}}, r"value -0.2 is not valid.*loss.margin"),
    ({"loss.kind": {"choice": ["vse_mh", "triplet"]}}, r"'triplet' is not valid.*loss.kind"),
    ({"loss.kind": {"uniform": [0, 1]}}, "needs a numeric key"),
    ({"train.epochs": {"uniform": [1.5, 3]}}, "must be integers"),
    ({"train.lr": {"grid": []}}, "non-empty list"),
])
def test_bad_space_entries_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        parse_space(_cfg(), raw)
    assert "\n" not in str(info.value)


def test_grid_with_optuna_is_refused_by_name():
    specs = parse_space(_cfg(), {"loss.margin": {"uniform": [0.1, 0.3]},
                                 "train.lr": {"grid": [1e-3, 3e-4]}})
    with pytest.raises(ConfigError, match=r"'train.lr'.*grid.*optuna.*use choice"):
        check_search(specs, "optuna")
    check_search(specs, "random")


def test_optuna_tpe_suggests_inside_the_space_and_limits_concurrency():
    from raycmr.tune.search import build_search_alg

    cfg = _cfg("tune.search=optuna", "tune.max_concurrent=2",
               "tune.space={loss.margin: {loguniform: [0.05, 0.5]}, "
               "loss.kind: {choice: [vse_mh, infonce]}, train.epochs: {choice: [2, 6]}}")
    specs = parse_space(cfg)
    check_search(specs, "optuna")
    alg = build_search_alg(cfg, specs)
    assert alg.set_search_properties("val_rsum", "max", param_space(cfg, specs))
    first, second = alg.suggest("a"), alg.suggest("b")
    assert alg.suggest("c") is None  # two running: tune.max_concurrent=2
    for params in (first, second):
        assert set(params) == {"loss.margin", "loss.kind", "train.epochs"}
        assert 0.05 <= params["loss.margin"] <= 0.5
        assert params["loss.kind"] in ("vse_mh", "infonce") and params["train.epochs"] in (2, 6)
    alg.on_trial_complete("a", {"val_rsum": 1.0, "epoch": 2})
    assert alg.suggest("c") is not None


def test_scheduler_budget_and_tune_settings_checks():
    from ray.tune.schedulers import FIFOScheduler

    from raycmr.tune.runner import check_tune_settings
    from raycmr.tune.search import build_scheduler, epoch_budget, max_epochs

    cfg = _cfg("train.epochs=3", "tune.grace_period=1", "tune.reduction_factor=2")
    asha = build_scheduler(cfg, parse_space(cfg, {"train.epochs": {"grid": [2, 8]}}))
    assert asha._max_t == 8 and [m for m, _ in asha._brackets[0]._rungs] == [8, 4, 2, 1]
    assert build_scheduler(cfg, parse_space(cfg))._max_t == 3
    dckt = _cfg("train.epochs=3", "train.task=dckt", "dckt.rounds=2", "dckt.epochs_per_round=4")
    assert epoch_budget(dckt) == 3 + 2 * 4  # DCKT's epoch counter runs on across rounds
    assert max_epochs(dckt, parse_space(dckt, {"dckt.rounds": {"choice": [1, 3]}})) == 3 + 3 * 4
    assert isinstance(build_scheduler(_cfg("tune.scheduler=fifo"), {}), FIFOScheduler)
    data = ["data.train=[x]", "data.val=[y]"]
    assert set(check_tune_settings(_cfg(*data))) == {"loss.margin", "train.lr"}
    for bad, needle in [("tune.reduction_factor=1", "tune.reduction_factor"),
                        ("tune.max_concurrent=0", "tune.max_concurrent"),
                        ("data.val=[]", "data.val"),
                        ("train.task=dckt", "train.task=dckt")]:
        with pytest.raises(ConfigError, match=needle):
            check_tune_settings(_cfg(*data, bad))


def test_default_space_follows_what_the_config_enables():
    plain = default_space(_cfg())
    assert set(plain) == {"loss.margin", "train.lr"}
    wiki = default_space(load_config("wikipedia"))  # VSE++ + DSCMR
    assert set(wiki) == {"loss.margin", "loss.weight", "loss.dscmr.alpha", "loss.dscmr.beta",
                         "train.lr"}
    everything = default_space(_cfg("loss.kind=infonce", "loss.grl.enabled=true",
                                    "train.task=dckt"))
    assert set(everything) == {"loss.temperature", "loss.weight", "loss.grl.alpha",
                               "dckt.alpha", "train.lr"}
    distill = default_space(load_config("wikipedia", ["loss.distill.enabled=true",
                                                      "loss.distill.feature_teacher=teacher_dir"]))
    assert set(distill) == set(wiki) | {"loss.distill.weight"}
    assert set(DEFAULT_SPACE) >= set(wiki) | set(everything) | set(distill)
    # the default space is what an empty tune.space means, and every entry is a valid config
    assert parse_space(load_config("wikipedia")) == wiki
    for key, spec in wiki.items():
        assert parse_space(load_config("wikipedia"), {key: spec.to_dict()})[key] == spec


# ------------------------------------------------------------------------ results writer


def _frame():
    return report.sort_frame(pd.DataFrame([
        {"trial_id": "t1", "loss.margin": 0.1, "loss.kind": "vse_mh", "val_avg_map": 0.61,
         "best_epoch": 4, "epochs": 4, "status": "completed", "error": "",
         "checkpoint": "/x/t1/checkpoint_3", "path": "/x/t1"},
        {"trial_id": "t2", "loss.margin": 0.3, "loss.kind": "infonce", "val_avg_map": 0.72,
         "best_epoch": 3, "epochs": 4, "status": "completed", "error": "",
         "checkpoint": "/x/t2/checkpoint_2", "path": "/x/t2"},
        {"trial_id": "t3", "loss.margin": 0.2, "loss.kind": "vse_mh", "val_avg_map": 0.30,
         "best_epoch": 1, "epochs": 1, "status": "stopped", "error": "", "checkpoint": "",
         "path": "/x/t3"},
        {"trial_id": "t4", "loss.margin": 0.05, "loss.kind": "infonce",
         "val_avg_map": float("nan"), "best_epoch": 0, "epochs": 0, "status": "error",
         "error": "ValueError: boom", "checkpoint": "", "path": "/x/t4"},
    ]), "val_avg_map")


def test_results_writer_table_plot_and_best(tmp_path):
    import matplotlib.image

    frame = _frame()
    params = ["loss.margin", "loss.kind"]
    assert list(frame["trial_id"]) == ["t2", "t1", "t3", "t4"]  # best first, errors last
    paths = report.write_report(frame, str(tmp_path), "val_avg_map", params, ["loss.margin"])
    csv = pd.read_csv(paths["csv"], keep_default_na=False, na_values=[""])
    parquet = pd.read_parquet(paths["parquet"])
    for table in (csv, parquet):
        assert list(table.columns) == list(frame.columns)
        assert list(table["trial_id"]) == ["t2", "t1", "t3", "t4"]
        assert list(table["status"]) == ["completed", "completed", "stopped", "error"]
        np.testing.assert_allclose(table["val_avg_map"], [0.72, 0.61, 0.30, np.nan])
        assert table["error"].fillna("").tolist() == ["", "", "", "ValueError: boom"]
    image = matplotlib.image.imread(paths["plot"])
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200  # two panels side by side

    best = report.write_best(load_config(None), frame, str(tmp_path), "val_avg_map", params)
    assert best["trial_id"] == "t2" and best["value"] == pytest.approx(0.72)
    assert best["params"] == {"loss.margin": 0.3, "loss.kind": "infonce"}
    assert best["checkpoint"] == "/x/t2/checkpoint_2"
    assert json.loads((tmp_path / report.BEST_JSON).read_text()) == best
    cfg = load_config(str(tmp_path / report.BEST_CONFIG))
    assert cfg.loss.margin == 0.3 and cfg.loss.kind == "infonce"
    assert cfg.train.name == "" and cfg.train.resume_from == ""


def test_error_summary_picks_the_error_line():
    text = ("Training failed due to worker errors:\n[Rank 0]\nTraceback (most recent call last):"
            "\n  File 'x.py', line 1\nraycmr.config.ConfigError: loss.margin must be >= 0\n")
    assert report.error_summary(RuntimeError(text)) == \
        "raycmr.config.ConfigError: loss.margin must be >= 0"
    assert report.error_summary(None) == ""
    assert report.error_summary(KeyError("x")) == "KeyError: 'x'"


# ------------------------------------------------------------- ASHA state across a resume


def test_resumable_asha_rebuilds_rungs_from_recorded_results(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from raycmr.tune.search import ResumableASHA

    def trial(tid, history):
        d = tmp_path / tid
        d.mkdir()
        (d / "result.json").write_text(
            "".join(json.dumps({"epoch": e, "m": v}) + "\n" for e, v in history) + '{"epo')
        return SimpleNamespace(trial_id=tid, local_path=str(d), path=None, storage=None,
                               run_metadata=SimpleNamespace(last_result=bool(history)))

    asha = ResumableASHA(time_attr="epoch", metric="m", mode="max", max_t=4, grace_period=1,
                         reduction_factor=2)
    # restored: two trials that reached epochs 1 and 2 with good values
    for t in (trial("a", [(1, 0.8), (2, 0.9)]), trial("b", [(1, 0.7), (2, 0.75)])):
        asha.on_trial_add(None, t)
    fresh = trial("c", [])
    asha.on_trial_add(None, fresh)
    # a plain ASHA would let the fresh trial through (no values recorded at epoch 1)
    assert asha.on_trial_result(None, fresh, {"epoch": 1, "m": 0.5}) == TrialScheduler.STOP
    better = trial("d", [])
    asha.on_trial_add(None, better)
    assert asha.on_trial_result(None, better, {"epoch": 1, "m": 0.85}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, better, {"epoch": 2, "m": 0.8}) == TrialScheduler.STOP


def test_cli_refuses_mixed_flags(capsys):
    from raycmr.cli import main

    assert main(["tune", "--resume", "somewhere", "--config", "quickstart"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["tune", "--retry-errored", "--config", "quickstart"]) == 2
    assert main(["tune", "--config", "quickstart",
                 "tune.space={loss.margn: {uniform: [0.1, 0.2]}}"]) == 2
    assert "'loss.margn'" in capsys.readouterr().err


# ------------------------------------------------------------ a real experiment on Ray


def _write_split(path: Path, n: int, rng, centers_img, centers_txt, prefix: str) -> None:
    labels = rng.integers(0, N_CLASSES, size=n)
    img = centers_img[labels] + 0.3 * rng.standard_normal((n, IMG_DIM))
    txt = centers_txt[labels] + 0.3 * rng.standard_normal((n, TXT_DIM))
    table = pa.table({
        "id": [f"{prefix}-{i}" for i in range(n)],
        "image_feat": pa.array(img.astype(np.float32).tolist(), pa.list_(pa.float32())),
        "text_feat": pa.array(txt.astype(np.float32).tolist(), pa.list_(pa.float32())),
        "label": pa.array(labels, pa.int64()),
        "image_id": [f"{prefix}-img-{i}" for i in range(n)],
    })
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-0.parquet")


@pytest.fixture(scope="module")
def feature_shards(tmp_path_factory):
    """Class-clustered image (16-d) and text (8-d) vectors in unrelated spaces: a random dual
    encoder ranks at chance, a trained one aligns the classes."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    centers_img = rng.standard_normal((N_CLASSES, IMG_DIM))
    centers_txt = rng.standard_normal((N_CLASSES, TXT_DIM))
    _write_split(root / "train", 256, rng, centers_img, centers_txt, "tr")
    _write_split(root / "val", 64, rng, centers_img, centers_txt, "va")
    return root


def _experiment_yaml(shards: Path, storage: Path, name: str) -> dict:
    return {
        "data": {"kind": "features", "train": [str(shards / "train")],
                 "val": [str(shards / "val")], "shuffle_buffer": 64,
                 "cache_train_rows": 100_000},
        "model": {"embed_dim": 16,
                  "image": {"kind": "mlp", "input_dim": IMG_DIM, "hidden_dims": [32]},
                  "text": {"kind": "mlp", "input_dim": TXT_DIM, "hidden_dims": [32]}},
        "loss": {"kind": "vse_mh", "margin": 0.2},
        "train": {"num_workers": 1, "batch_size": 32, "epochs": EPOCHS, "warmup_steps": 1,
                  "log_every": 100, "torch_threads": 1, "max_failures": 0,
                  "storage_path": str(storage / "train_runs")},
        "eval": {"metric": "map"},
        "tune": {"space": {"train.lr": {"grid": LRS}, "loss.margin": {"uniform": [0.1, 0.3]}},
                 "num_samples": 1, "max_concurrent": 2, "search": "random", "scheduler": "asha",
                 "grace_period": 1, "reduction_factor": 2, "storage_path": str(storage),
                 "name": name},
    }


def _trial_states(exp: Path) -> dict[str, str]:
    """trial id -> status from the newest experiment state file Tune has written."""
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (json.JSONDecodeError, OSError):  # being written
        return {}
    out = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.ray
def test_failing_trials_are_recorded_and_the_search_goes_on(ray_cluster, feature_shards,
                                                            tmp_path, capsys):
    from raycmr.cli import main

    raw = _experiment_yaml(feature_shards, tmp_path, "failing")
    # 256 training rows give no full batch of these sizes: each trial's trainer refuses to start
    raw["tune"]["space"] = {"train.batch_size": {"grid": [1000, 2000]}}
    config_file = tmp_path / "failing.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert main(["tune", "--config", str(config_file)]) == 1
    assert "no trial reported a validation metric" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "failing" / report.RESULTS_CSV)
    assert sorted(table["train.batch_size"]) == [1000, 2000]  # the second ran after the first
    assert (table["status"] == "error").all() and (table["epochs"] == 0).all()
    for size, error in zip(table["train.batch_size"], table["error"]):
        assert error.startswith("raycmr.config.ConfigError: 256 training rows give no full batch")
        assert f"train.batch_size={size}" in error
    assert not (tmp_path / "failing" / report.BEST_CONFIG).exists()


@pytest.mark.ray
def test_tune_asha_kill_resume_best_config(ray_cluster, feature_shards, tmp_path, capsys):
    from raycmr.cli import main

    storage = tmp_path / "tune"
    config_file = tmp_path / "tiny_tune.yaml"
    raw = _experiment_yaml(feature_shards, storage, "exp")
    # relative shard paths, as users write them: every trial runs in its own working directory
    for split in ("train", "val"):
        raw["data"][split] = [os.path.relpath(feature_shards / split)]
    config_file.write_text(yaml.safe_dump(raw))
    exp = storage / "exp"

    # 1. start `raycmr tune` on the same Ray cluster; kill it once a trial has finished
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    log = tmp_path / "tune.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "raycmr.cli", "tune", "--config",
                                 str(config_file)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline, states = time.time() + 600, {}
    try:
        while time.time() < deadline and proc.poll() is None:
            states = _trial_states(exp)
            if "TERMINATED" in states.values():
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")[-3000:]
    finished = {t for t, s in states.items() if s == "TERMINATED"}
    assert finished
    before = {t: (_lines(exp / t / "result.json"),
                  sorted(p.name for p in (exp / "train_runs" / t).glob("checkpoint_*")))
              for t in finished}
    assert all(n >= 1 for n, _ in before.values())

    # 2. resume: finished trials stay as they were, the others run to the end
    capsys.readouterr()
    assert main(["tune", "--resume", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "best trial:" in out and "best config:" in out
    table = pd.read_csv(exp / report.RESULTS_CSV, keep_default_na=False, na_values=[""])
    assert pd.read_parquet(exp / report.RESULTS_PARQUET).shape == table.shape
    assert (exp / report.PLOT_PNG).stat().st_size > 1000
    assert len(table) == len(LRS) and set(finished) <= set(table["trial_id"])
    assert sorted(table["train.lr"]) == sorted(LRS)
    assert set(table["status"]) <= {"completed", "stopped"}, table.to_string()
    for t, (n, ckpts) in before.items():
        assert _lines(exp / t / "result.json") == n, f"finished trial {t} ran again"
        assert sorted(p.name for p in (exp / "train_runs" / t).glob("checkpoint_*")) == ckpts
    # ASHA: the trial that cannot learn was stopped early, the best ran the whole budget
    weak = table[table["train.lr"] < 1e-6]
    assert len(weak) == 1 and (weak["epochs"] < EPOCHS).all() \
        and (weak["status"] == "stopped").all(), table.to_string()
    best = json.loads((exp / report.BEST_JSON).read_text())
    assert best["trial_id"] == table["trial_id"][0]
    assert best["epochs"] == EPOCHS and best["params"]["train.lr"] in LRS[:2]
    assert best["value"] > 0.6 > table["val_avg_map"].iloc[-1], table.to_string()
    assert Path(best["checkpoint"]).is_dir()

    # 3. the best config is a plain training config: it loads and trains
    cfg = load_config(best["config"])
    assert cfg.train.lr == best["params"]["train.lr"]
    assert cfg.loss.margin == pytest.approx(best["params"]["loss.margin"])
    assert cfg.train.name == "" and cfg.train.epochs == EPOCHS
    assert main(["train", "--config", best["config"], "train.epochs=1",
                 f"train.storage_path={tmp_path / 'best_runs'}", "train.name=best"]) == 0
    assert "val_avg_map" in capsys.readouterr().out
    assert list((tmp_path / "best_runs" / "best").glob("checkpoint_*"))

    # 4. the trials ASHA stopped gave their workers' CPUs back: Ray Train's PlacementGroupCleaner
    # removes a dead run's placement group (it needs the dashboard's State API)
    deadline, live = time.time() + 60, None
    while time.time() < deadline:
        live = [pg["bundles"] for pg in ray_cluster.util.placement_group_table().values()
                if pg["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(0.25)
    assert not live, live
