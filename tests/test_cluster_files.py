"""The files of cluster/: launcher YAML, KubeRay manifests, Dockerfile and the local script.

Cheap checks of what would break a deployment: schemas (Ray's launcher schema, Serve's config
schema), the rayjob entrypoint against raycmr's own config loader, one Ray version everywhere,
resource bounds that make sense, and the shell script's syntax and argument errors.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from raycmr.config import CONFIG_DIR, ServeConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCRIPT = CLUSTER / "local_multinode.sh"


def _ray_pin() -> str:
    match = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path} holds no YAML mappings"
    return docs


def _launcher() -> dict:
    (doc,) = _docs(CLUSTER / "ray-cluster.aws.yaml")
    return doc


def _ray_object(path: Path, kind: str) -> dict:
    objs = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(objs) == 1, f"{path.name}: expected one {kind}, found {len(objs)}"
    return objs[0]


def _cluster_spec(path: Path, kind: str) -> dict:
    obj = _ray_object(path, kind)
    spec = obj["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[kind]()


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"]] + cluster_spec.get("workerGroupSpecs", [])
    return [g["template"]["spec"] for g in groups]


def _gpus_per_pod(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


MANIFESTS = [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
             ("rayservice.yaml", "RayService")]


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"ray-cluster.aws.yaml", "raycluster.yaml", "rayjob.yaml",
                                       "rayservice.yaml"}
    for f in files:
        _docs(f)


# ------------------------------------------------------------------------- cluster launcher


def test_launcher_node_types_and_gpu_workers():
    cfg = _launcher()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types, "no worker node type declares GPU resources"
    for name, t in gpu_types.items():
        assert name != cfg["head_node_type"]
        assert t["resources"]["CPU"] >= t["resources"]["GPU"], name  # >= 1 CPU per train worker
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]


def test_launcher_passes_rays_own_schema():
    pytest.importorskip("jsonschema")
    from raycmr.compat import validate_cluster_config

    validate_cluster_config(copy.deepcopy(_launcher()))


def test_launcher_installs_the_mounted_checkout_with_the_pinned_ray():
    cfg = _launcher()
    remote = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1, "the raycmr checkout ('.') must be file-mounted exactly once"
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert any(f"-e {remote[0]}" in c and f"{remote[0]}/constraints.txt" in c for c in installs)
    pin = _ray_pin()
    for key in ("image", "head_image", "worker_image"):
        if key in cfg["docker"]:
            assert cfg["docker"][key].startswith(f"rayproject/ray:{pin}-"), key
    # the same auth mode on head and workers, or workers cannot join
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


def test_dockerfile_uses_the_pinned_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{_ray_pin()}-")
    assert "-c constraints.txt" in text


# -------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name,kind", MANIFESTS)
def test_kuberay_kind_version_and_groups(name, kind):
    path = KUBERAY / name
    obj = _ray_object(path, kind)
    assert obj["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(path, kind)
    assert spec["rayVersion"] == _ray_pin()
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    if kind != "RayService":
        assert any(_gpus_per_pod(g) > 0 for g in groups), "no GPU worker group"
        assert spec["enableInTreeAutoscaling"] is True
    # one image everywhere, and every serviceAccountName defined in the same file
    images = {c["image"] for p in _pod_specs(spec) for c in p["containers"]}
    assert len(images) == 1, images
    accounts = {d["metadata"]["name"] for d in _docs(path) if d.get("kind") == "ServiceAccount"}
    for pod in _pod_specs(spec):
        if "serviceAccountName" in pod:
            assert pod["serviceAccountName"] in accounts


def test_rayjob_entrypoint_is_a_valid_raycmr_train():
    path = KUBERAY / "rayjob.yaml"
    argv = shlex.split(_ray_object(path, "RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["raycmr", "train"]
    config = argv[argv.index("--config") + 1]
    shipped = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert config in shipped, f"--config {config} is not a shipped config: {sorted(shipped)}"
    overrides = [a for a in argv[2:] if "=" in a]
    cfg = load_config(config, overrides)  # raises ConfigError on a wrong key or value
    assert cfg.train.use_gpu is True
    assert cfg.train.storage_path.startswith("s3://")
    assert all(p.startswith("s3://") for p in cfg.data.train + cfg.data.val + cfg.data.test)
    # the job's GPUs at start = train.num_workers (one Train worker per GPU)
    groups = _cluster_spec(path, "RayJob")["workerGroupSpecs"]
    gpus = sum(g["replicas"] * _gpus_per_pod(g) for g in groups)
    assert cfg.train.num_workers == gpus


def test_rayservice_serve_config():
    from ray.serve.schema import ServeDeploySchema

    svc = _ray_object(KUBERAY / "rayservice.yaml", "RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    parse = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    schema = parse(serve_cfg)
    (app,) = schema.applications
    assert app.import_path == "raycmr.serve.app:build_app"
    assert {"index_path", "checkpoint"} <= set(app.args)
    assert set(app.args) <= set(ServeConfig.__dataclass_fields__), "args must be ServeConfig keys"


# --------------------------------------------------------------------------- local script


SHELL_SCRIPTS = sorted([*CLUSTER.glob("*.sh"), *(ROOT / "jobs").glob("*.sh")])


def _bash_syntax_error(path: Path) -> str:
    """bash's parse error for ``path`` (``bash -n`` reads without running), "" when it parses."""
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    return proc.stderr if proc.returncode else ""


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_syntax(script, tmp_path):
    assert SCRIPT in SHELL_SCRIPTS and len(SHELL_SCRIPTS) >= 2
    assert _bash_syntax_error(script) == ""
    # the check bites: the same script with one block left open does not parse
    broken = tmp_path / script.name
    broken.write_text(script.read_text() + "\nif true; then\n  :\n")
    assert "unexpected end of file" in _bash_syntax_error(broken)


@pytest.mark.parametrize("args,needle", [
    (["bogus"], "usage: bash cluster/local_multinode.sh"),
    (["up", "--workers", "two"], "--workers must be a whole number"),
    (["up", "--worker-cpus"], "--worker-cpus must be a whole number"),
    (["up", "--gpus", "1"], "unknown option '--gpus'"),
    (["status"], "no cluster running"),
    (["env"], "no cluster running"),
])
def test_local_script_rejects_bad_use_without_starting_ray(tmp_path, args, needle):
    env = {"PATH": "/usr/bin:/bin", "RAYCMR_LOCAL_DIR": str(tmp_path / "r")}
    out = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode != 0
    assert needle in out.stdout + out.stderr
