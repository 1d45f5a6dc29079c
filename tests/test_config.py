"""Config loading: shipped YAMLs, dotted overrides, one-line errors naming the key and fix."""

import pytest

from raycmr.cli import main
from raycmr.config import ConfigError, load_config, with_overrides


def test_shipped_config_and_overrides():
    cfg = load_config("quickstart", ["train.num_workers=3", "loss.margin=0.35",
                                     "data.train=[a,b]", "loss.global_negatives=false"])
    assert cfg.train.num_workers == 3
    assert cfg.loss.margin == pytest.approx(0.35)
    assert cfg.data.train == ["a", "b"]
    assert cfg.loss.global_negatives is False
    assert cfg.model.image.channels == [16, 32, 64, 64]  # untouched keys keep the YAML's


@pytest.mark.parametrize("override,needle", [
    (["train.num_wrkers=2"], "unknown config key 'train.num_wrkers'"),
    (["train.num_workers=two"], "'train.num_workers' must be an integer"),
    (["loss.kind=triplet"], "'loss.kind' is 'triplet'; choose one of"),
    (["train.batch_size=0"], "'train.batch_size' must be positive"),
    (["loss.dscmr.enabled=true", "model.num_classes=0"], "model.num_classes"),
    (["data.kind=features"], "set model.image.kind=mlp"),
    (["loss.anchors=rank"], "'loss.anchors' is 'rank'; choose one of"),
    (["loss.anchors=local", "loss.kind=none"], "loss.anchors=local splits a contrastive loss"),
    (["loss.anchors=local", "train.task=slow"], "train.task=slow"),
    (["loss.anchors=local", "loss.global_negatives=false"], "set loss.global_negatives=true"),
    (["loss.grl.update=flip"], "'loss.grl.update' is 'flip'; choose one of"),
    (["loss.grl.label_smoothing=1.0"], "loss.grl.label_smoothing must be in [0, 1)"),
    (["loss.grl.disc_lr_scale=0"], "loss.grl.disc_lr_scale must be > 0"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config("quickstart", override)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_config_name_lists_shipped():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no-such-config")


def test_round_trip_through_yaml(tmp_path):
    cfg = with_overrides(load_config("wikipedia"), {"loss.margin": 0.1, "train.lr": 3e-4})
    path = tmp_path / "best.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again == cfg


def test_cli_reports_config_error_in_one_line(capsys):
    assert main(["config", "--config", "quickstart", "train.epochs=-x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.epochs" in err[0]


def test_with_absolute_paths_keeps_uris_and_absolute_paths(tmp_path, monkeypatch):
    from raycmr.data.paths import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config("wikipedia", ["data.test=[s3://bucket/test]", "data.val=[/abs/val]",
                                    "train.resume_from=runs/ckpt"])
    out = with_absolute_paths(cfg)
    assert out.data.train == [str(tmp_path / "out/wikipedia/shards/train")]
    assert out.data.val == ["/abs/val"] and out.data.test == ["s3://bucket/test"]
    assert out.train.resume_from == str(tmp_path / "runs/ckpt")
    assert out.dckt.source == [] and cfg.data.train == ["out/wikipedia/shards/train"]


def test_train_task_is_the_one_method_switch():
    from raycmr.config import choices
    from raycmr.train.registry import METHODS, validation_metric

    assert set(choices("train.task")) == set(METHODS) == {"dual_encoder", "dckt", "slow"}
    assert load_config("dckt_wikipedia", ["model.num_classes=5"]).train.task == "dckt"
    with pytest.raises(ConfigError, match=r"^dckt.enabled was replaced by train.task=dckt") as exc:
        load_config(None, ["dckt.enabled=true"])
    assert "\n" not in str(exc.value)
    # checkpoints written before the switch hold dckt.enabled=false: it asks for the default
    assert load_config(None, ["dckt.enabled=false"]).train.task == "dual_encoder"
    assert validation_metric(load_config(None, ["train.task=slow"])) == "val_t2i_r1"
    assert validation_metric(load_config(None, ["train.task=dckt"])) == "val_rsum"


def test_a_checkpoint_saved_before_a_rename_still_loads(tmp_path):
    """A run's stored config.yaml with old keys reads in today's keys; a user's config with
    them still stops with the one-line rename error."""
    import yaml

    from raycmr.artifacts import CONFIG_FILE, MODEL_FILE, read_config

    old = load_config("wikipedia").to_dict()
    old["loss"]["distill"]["reranker"] = old["loss"]["distill"].pop("feature_teacher")
    old["dckt"]["enabled"] = True
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    (tmp_path / MODEL_FILE).write_bytes(b"")  # a checkpoint dir: its weights are not read here
    cfg = read_config(tmp_path)
    assert cfg.train.task == "dckt" and cfg.loss.distill.feature_teacher == ""
    assert cfg.to_dict()["data"] == old["data"]
    with pytest.raises(ConfigError, match="^loss.distill.reranker was renamed"):
        load_config(None, ["loss.distill.reranker=x"])
