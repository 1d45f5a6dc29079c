"""One typed configuration tree for every raycmr component.

A config is built from a YAML file (a shipped name such as ``quickstart`` or a path) plus dotted
command-line overrides (``train.num_workers=2 loss.margin=0.2``). Unknown keys and values of the
wrong type raise :class:`ConfigError` with a one-line message naming the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


@dataclass
class HardNegativesConfig:
    """Compositional hard negatives (NegCLIP; raycmr/data/perturb.py): each training caption's
    ``k`` perturbed captions join the contrastive loss as extra negatives of its image."""

    kind: Literal["none", "synthetic", "generic"] = "none"  # "none", "synthetic" (grammar-aware, the synthetic captions) or "generic" (word swaps, real captions)
    k: int = 3  # perturbed captions per caption (fewer when the perturber finds fewer)


@dataclass
class DataConfig:
    kind: Literal["images", "features"] = "images"  # "images" (encoded image bytes + captions) or "features" (vectors)
    train: list[str] = field(default_factory=list)  # shard files/dirs/globs; local or s3:// gs://
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    format: Literal["auto", "parquet", "webdataset"] = "auto"  # "parquet", "webdataset" or "auto" (by file extension)
    image_size: int = 64
    augment: bool = True  # random crop + flip on training images
    tokenizer: str = "minilm"  # "minilm" (offline package) or a local path / hub id
    max_text_len: int = 32
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0 = off)
    prefetch_batches: int = 1  # batches Ray Data's iterator prepares ahead in each worker
    num_cpus_per_map_task: float = 1.0
    # Training sets of at most this many rows are read and decoded once and kept in Ray's
    # object store (the per-epoch order still comes from each worker's shuffle buffer); 0 = never.
    cache_train_rows: int = 0
    # Ray Data's Parquet read path: "v1" (ParquetDatasource: 16x faster start in
    # benchmarks/bench_ingest.py on Ray 2.60), "v2" (Ray 2.60's default) or "ray_default".
    parquet_reader: Literal["v1", "v2", "ray_default"] = "v1"
    # CPUs kept free for Ray Data's read/preprocess tasks beside the training workers: checked
    # against the cluster before training (raycmr.resources), added to a local cluster's size.
    reserved_cpus: float = 2.0
    hard_negatives: HardNegativesConfig = field(default_factory=HardNegativesConfig)
    # 0: training rows are batched freely. N > 0: the training rows that share a value of the
    # shards' `group` column (a scene and its rendered hard negatives, `raycmr shards synthetic
    # --hard-images`) come in one batch, so each is the others' in-batch negative in both
    # directions; groups hold at most N rows and train.batch_size counts groups.
    group_size: int = 0


@dataclass
class TowerConfig:
    kind: Literal["hf_config", "hf_pretrained", "minilm", "mlp", "cnn"] = "hf_config"  # "hf_config" (random init), "hf_pretrained", "minilm", "mlp" or "cnn" (image: small conv net, raycmr/models/towers.py)
    name_or_path: str = ""  # for hf_pretrained
    hf_config: dict[str, Any] = field(default_factory=dict)  # for hf_config: includes model_type
    input_dim: int = 0  # for mlp
    hidden_dims: list[int] = field(default_factory=lambda: [512])  # for mlp
    dropout: float = 0.0
    input_norm: Literal["none", "layernorm", "batchnorm"] = "none"  # mlp: "none", "layernorm" or "batchnorm" on the input vector
    freeze: bool = False  # the backbone's weights stay fixed (a pooling head still trains)
    # How token states / a spatial map become one vector: "auto" (hf vision: pooler or [CLS];
    # text: mean over tokens; cnn: flatten), "mean", "attention" (one learned query, CLIP's
    # AttentionPool2d for a cnn map) or "flatten" (cnn: the whole grid x grid map -> out_dim)
    pool: Literal["auto", "mean", "attention", "flatten"] = "auto"
    heads: int = 4  # attention pooling heads
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])  # cnn: conv widths
    grid: int = 8  # cnn: the spatial map is pooled to grid x grid before the pooling head
    out_dim: int = 256  # cnn flatten: width of the projection of the flattened map
    # frozen text backbones: token states memoised per distinct caption (per process), so
    # each caption runs through the frozen model once per run; 0 = off
    cache_captions: int = 20_000


@dataclass
class ModelConfig:
    image: TowerConfig = field(default_factory=TowerConfig)
    text: TowerConfig = field(default_factory=TowerConfig)
    embed_dim: int = 128
    shared_layers: int = 0  # weight-shared top layers after the projections
    num_classes: int = 0  # DSCMR linear classifier on the common space (0 = none)
    # Where retrieval ranks (evaluation, index, serving): "common" = cosine in the common space;
    # "label" = P(same class) from the classifier's posteriors (needs num_classes)
    retrieval_space: Literal["common", "label"] = "common"
    label_temperature: float = 1.0  # softmax temperature of the label-space posteriors


@dataclass
class GRLConfig:
    """The modality adversary (raycmr/losses/adversary.py). ``update``: ``confusion`` = two-player
    (the discriminator learns on detached embeddings, the encoders are pushed to make it say 0.5);
    ``reversal`` = one reversed gradient (the encoders maximise its loss; it swaps the modalities'
    sides, kept for comparison). ``lambda`` (schedule) scales the encoders' part."""

    enabled: bool = False
    weight: float = 1.0
    update: Literal["confusion", "reversal"] = "confusion"
    label_smoothing: float = 0.0  # of the discriminator's targets (confusion update)
    disc_lr_scale: float = 1.0  # the discriminator's learning rate = train.lr * this
    schedule: Literal["constant", "dann", "dynamic"] = "dann"  # "constant", "dann" or "dynamic"
    lambda_: float = 1.0  # constant schedule value
    gamma: float = 10.0  # DANN schedule steepness
    alpha: float = 1.0  # ceiling of the lambda schedules
    ramp_samples: int = 100_000  # dynamic schedule: samples seen to reach the ceiling
    hidden_dim: int = 128


@dataclass
class DSCMRConfig:
    enabled: bool = False
    weight: float = 1.0  # weight of the common-space discrimination loss
    alpha: float = 0.1  # weight of the label-space loss ||P - Y||_F
    beta: float = 0.1  # weight of the modality invariance loss ||U - V||_F


@dataclass
class DistillConfig:
    """Slow -> fast distillation (raycmr/losses/distill.py). One teacher: ``feature_teacher``
    (feature shards: a cross-attention scorer of feature vectors scores all B^2 pairs of the
    batch) or ``slow`` (image shards:
    the captioning model of a ``train.task=slow`` checkpoint scores each caption against its
    image and ``hard_negatives`` other in-batch images: the fast model's hardest ones
    (``candidates: hardest``, section 2.2 of Miech et al.) or uniformly random ones (``random``))."""

    enabled: bool = False
    weight: float = 1.0
    feature_teacher: str = ""  # feature shards: a directory written by `raycmr teacher`
    slow: str = ""  # image shards: a checkpoint of `raycmr train --config quickstart_slow`
    hard_negatives: int = 7  # slow teacher: m in-batch negative images per caption (B*(m+1) pairs)
    candidates: Literal["hardest", "random"] = "hardest"  # how the slow teacher's m are chosen
    start: float = 0.0  # fraction of the run's optimizer steps before the distillation term starts
    temperature: float = 1.0  # softmax temperature of the teacher's scores


@dataclass
class MHWarmupConfig:
    """VSE++ max-of-hinges from random init (raycmr.losses.handover): ``loss`` trains alone up to
    training progress ``start``, then hands over to MH along a half-cosine, MH alone from ``end``."""

    loss: Literal["none", "vse_sh", "infonce", "soft"] = "none"  # "none" = plain MH
    start: float = 0.0  # fraction of the run's optimizer steps
    end: float = 0.0
    tau: float = 0.05  # "soft": smoothing temperature at the start, annealed to 0 (= MH) at end


@dataclass
class LossConfig:
    kind: Literal["vse_mh", "vse_sh", "infonce", "none"] = "vse_mh"  # "vse_mh", "vse_sh", "infonce" or "none"
    weight: float = 1.0
    margin: float = 0.2
    temperature: float = 0.07  # InfoNCE initial temperature (learnable)
    global_negatives: bool = True  # gather embeddings across workers before the loss
    # who scores what over the gathered batch (raycmr/losses/batch.py): "global" = every worker
    # all N x N pairs, "local" = its own B anchors x all N candidates, "auto" = global up to 2
    # workers, local beyond
    anchors: Literal["auto", "global", "local"] = "auto"
    mh_warmup: MHWarmupConfig = field(default_factory=MHWarmupConfig)  # kind vse_mh only
    grl: GRLConfig = field(default_factory=GRLConfig)
    dscmr: DSCMRConfig = field(default_factory=DSCMRConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class DCKTConfig:
    source: list[str] = field(default_factory=list)
    target: list[str] = field(default_factory=list)
    mmd_weight: float = 1.0
    pair_weight: float = 0.1
    semantic_weight: float = 1.0
    kernel_bandwidths: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    rounds: int = 3
    alpha: float = 0.8  # ceiling of the per-pair selection probability
    epochs_per_round: int = 5
    source_classes: int = 0  # source classifier outputs; 0 = max source label + 1


@dataclass
class TrainConfig:
    # the method (raycmr.train.registry): the dual encoder, DCKT's rounds (dckt.*) or the
    # slow captioning model (slow.*)
    task: Literal["dual_encoder", "dckt", "slow"] = "dual_encoder"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Custom resources each worker needs, e.g. {raycmr_worker: 1} on cluster/local_multinode.sh,
    # whose nodes offer one each: one training worker per node.
    worker_resources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 64  # per worker, per micro-step
    grad_accum: int = 1
    epochs: int = 3
    max_steps: int = 0  # > 0 stops after this many optimizer steps
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"
    log_every: int = 10
    checkpoint_every_epochs: int = 1
    num_to_keep: int = 2
    # local dir, NFS or s3:// gs://; when joining a cluster (RAY_ADDRESS, `ray job submit`) an
    # absolute path every node shares or a URI (a relative one is refused)
    storage_path: str = "runs"
    name: str = ""  # run name; empty = generated
    # a checkpoint dir to continue from; DeepSpeed unpickles it (not weights_only): trusted
    # storage only
    resume_from: str = ""
    max_failures: int = 1  # automatic restarts after a worker failure
    seed: int = 0
    torch_threads: int = 0  # 0 = leave torch's default
    # GradCache (Gao et al. 2021, raycmr/train/grad_cache.py): embed the batch in chunks of this
    # many rows without graph, take the loss's gradient w.r.t. the embeddings once, then
    # re-encode each chunk with graph and its slice of that gradient; 0 = off
    embed_chunk: int = 0


@dataclass
class EvalConfig:
    split: Literal["val", "test"] = "test"  # what `raycmr eval` evaluates by default
    batch_size: int = 256
    metric: Literal["rsum", "map"] = "rsum"  # validation metric for model selection: "rsum" or "map"
    cache_val_rows: int = 20_000  # decode the validation set once when it has at most this many


@dataclass
class TuneConfig:
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 8
    max_concurrent: int = 2
    search: Literal["random", "optuna"] = "random"  # "random" (incl. grid entries) or "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"  # "asha" or "fifo"
    grace_period: int = 1
    reduction_factor: int = 2
    time_budget_s: float = 0.0  # 0 = no limit
    storage_path: str = "runs/tune"
    name: str = ""


@dataclass
class IndexConfig:
    kind: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = 1024
    nprobe: int = 64  # 16 gave recall@10 0.55-0.60 on low-rank data (benchmarks/bench_index.py)
    hnsw_m: int = 32
    ef_search: int = 64


MAX_BETA = 1000.0  # |serve.beta| and a request's beta: h + beta * fast stays finite


@dataclass
class ServeConfig:
    """The retrieval service (``raycmr serve``, ``serve deploy jobs/serve_config.yaml``)."""

    index_path: str = ""
    checkpoint: str = ""
    top_k: int = 100  # candidates retrieved per query
    # The slow stage (Miech et al. 2021): the fast top rerank_k re-ranked by
    # h(x, y) + beta * f(x)^T g(y); a request may ask for another rerank_k (up to max_rerank_k,
    # and never above top_k) and beta.
    rerank_k: int = 20
    max_rerank_k: int = 50
    beta: float = 0.0
    route_prefix: str = "/"
    # A slow-model checkpoint (`raycmr train --config quickstart_slow`); "" = the one whose
    # phi(x) the index stores (`raycmr index --slow`), none there = no slow stage; "none" = off
    slow_checkpoint: str = ""
    max_batch_size: int = 16  # requests batched into one forward pass / FAISS search
    batch_wait_timeout_s: float = 0.01
    use_gpu: bool = False  # query encoder and slow scorer on a GPU
    host: str = "127.0.0.1"  # HTTP host; 0.0.0.0 listens on every interface
    port: int = 8000
    # Replicas of every deployment at start (autoscaling between replicas and max_replicas):
    # 2 keeps the service answering while one replica dies and is replaced.
    replicas: int = 2
    max_replicas: int = 4
    retries: int = 3  # attempts more per search when a downstream replica dies mid-request
    # Bearer-token check on every route but /healthz: "token" (the token comes from the
    # environment variable named by token_env, else from token_file) or "none" (no check).
    auth: Literal["token", "none"] = "token"
    token_env: str = "RAYCMR_SERVE_TOKEN"
    token_file: str = ""
    max_body_bytes: int = 4_000_000  # larger request bodies get 413 (image uploads included)
    max_query_chars: int = 1000  # longer text queries get 422
    docs: bool = False  # FastAPI's /docs, /redoc and /openapi.json
    # The page's sign-in (raycmr/serve/sessions.py): /login sets a session cookie (never the
    # token) that lasts session_hours; it is Secure when public_https (clients reach the service
    # through a TLS proxy) or a trusted proxy's X-Forwarded-Proto says https.
    public_https: bool = False
    trusted_proxies: list[str] = field(default_factory=list)  # proxy IPs whose X-Forwarded-* count
    session_hours: float = 12.0
    login_failures_per_minute: int = 5  # failed /login attempts per client before 429


@dataclass
class SlowConfig:
    """The slow stage (raycmr/models/slow.py): spatial image tokens + captioning decoders."""

    vision: Literal["fpn", "patch"] = "fpn"  # "fpn" (CNN, upsampled last map fused with a finer one) or "patch"
    vision_layers: int = 0  # patch: transformer encoder layers over the patch tokens
    width: int = 128
    heads: int = 4
    decoder_layers: int = 2
    dropout: float = 0.0
    bidirectional: bool = True  # a second, right-to-left decoder
    length_norm: bool = False  # h divided by the predicted tokens per direction
    max_vocab: int = 0  # shortlist size (most frequent training tokens); 0 = all seen
    # Validation / evaluation: re-rank this fast checkpoint's top-K (empty = slow-only)
    fast_checkpoint: str = ""
    rerank_k: int = 20
    beta: float = 0.0  # final score = h + beta * fast dot product
    val_queries: int = 100  # slow-only validation: this many captions against every image


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    dckt: DCKTConfig = field(default_factory=DCKTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    slow: SlowConfig = field(default_factory=SlowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


# ------------------------------------------------------------------------------------ building


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` to ``typ`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(typ, value, key + ".")
    if origin in (list, tuple):
        (item_type,) = typing.get_args(typ)[:1]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if not isinstance(choices[0], str) and isinstance(value, (str, float)):
            try:  # "2" or 2.0 for an int choice
                value = value if float(value) != int(float(value)) else int(float(value))
            except ValueError:
                pass
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"config key '{key}' is {value!r}; choose one of "
                              f"{', '.join(str(c) for c in choices)}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config key '{key}' must be {'an integer' if typ is int else 'a number'}, "
                f"got {value!r}"
            ) from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        return list(yaml.safe_load(text))
    return [t for t in text.split(",") if t] if text else []


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys under "
                f"'{prefix.rstrip('.') or 'top level'}': {', '.join(types_)}"
            )
        kwargs[key] = _coerce(value, types_[key], prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("space", "hf_config"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config name (``quickstart``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"config '{name_or_path}' not found: give a YAML file path or one of the shipped configs: "
        f"{', '.join(names)}"
    )


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict with YAML-parsed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return nested


#: renamed key -> its new name; a config still setting the old one gets a one-line error
RENAMED = {"loss.distill.reranker": "loss.distill.feature_teacher"}


def _check_renamed(values: dict[str, Any]) -> None:
    for old, new in RENAMED.items():
        node: Any = values
        for part in old.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{old} was renamed {new}: set {new}={node} instead")


def upgrade_saved(values: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config in today's keys: a run saved before a rename keeps loading
    (a user's own config with an old key gets the one-line error instead)."""
    values = copy.deepcopy(values or {})
    for old, new in RENAMED.items():
        *path, leaf = old.split(".")
        node: Any = values
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[new.split(".")[-1]] = node.pop(leaf)
    dckt = values.get("dckt")
    enabled = dckt.pop("enabled", False) if isinstance(dckt, dict) else False
    if enabled not in (False, "false", "False", 0):
        values.setdefault("train", {})["task"] = "dckt"
    return values


def config_from_dict(values: dict[str, Any]) -> Config:
    _check_renamed(values or {})
    dckt = (values or {}).get("dckt")
    if isinstance(dckt, dict) and "enabled" in dckt:
        if dckt["enabled"] not in (False, "false", "False", 0):
            raise ConfigError("dckt.enabled was replaced by train.task=dckt: set train.task=dckt "
                              "and remove dckt.enabled")
        values = {**values, "dckt": {k: v for k, v in dckt.items() if k != "enabled"}}
    cfg = _build(Config, values or {})
    validate(cfg)
    return cfg


ENV_OVERRIDES = "RAYCMR_OVERRIDES"


def env_overrides() -> list[str]:
    """Dotted overrides from ``$RAYCMR_OVERRIDES`` (space-separated), applied by ``raycmr train``
    before the command line's: e.g. ``RAYCMR_OVERRIDES="train.epochs=1"`` makes every documented
    training command a short smoke run (the docs test runs them so)."""
    import shlex

    return shlex.split(os.environ.get(ENV_OVERRIDES, ""))


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (shipped name or path), apply dotted overrides, validate."""
    values: dict[str, Any] = {}
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    values = _merge(values, parse_overrides(overrides or []))
    return config_from_dict(values)


def with_overrides(cfg: Config, flat: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys replaced (used by Tune trials)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(_merge(cfg.to_dict(), nested))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of ``cfg`` with dotted command-line ``overrides`` (``["index.nlist=256"]``) applied
    (used for a checkpoint's config by ``raycmr eval``/``index``)."""
    if not overrides:
        return cfg
    return config_from_dict(_merge(cfg.to_dict(), parse_overrides(overrides)))


def choices(key: str) -> tuple[Any, ...]:
    """The values a Literal-typed config key allows (``choices("index.kind")``), else ()."""
    cls: Any = Config
    *parents, name = key.split(".")
    for part in parents:
        cls = _field_types(cls)[part]
    typ = _field_types(cls)[name]
    return typing.get_args(typ) if typing.get_origin(typ) is typing.Literal else ()


def _validate_serve(s: ServeConfig) -> None:
    if s.top_k <= 0:
        raise ConfigError(f"serve.top_k must be positive, got {s.top_k}")
    if not 0 <= s.rerank_k <= s.top_k:
        raise ConfigError(f"serve.rerank_k must be in [0, top_k={s.top_k}], got {s.rerank_k}")
    if not s.rerank_k <= s.max_rerank_k:
        raise ConfigError(f"serve.rerank_k ({s.rerank_k}) must be <= serve.max_rerank_k "
                          f"({s.max_rerank_k})")
    if not math.isfinite(s.beta) or abs(s.beta) > MAX_BETA:
        raise ConfigError(f"serve.beta must be a number in [-{MAX_BETA:g}, {MAX_BETA:g}], "
                          f"got {s.beta}")
    for key in ("max_batch_size", "replicas", "max_body_bytes", "max_query_chars",
                "session_hours", "login_failures_per_minute"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"serve.{key} must be positive, got {getattr(s, key)}")
    if s.batch_wait_timeout_s < 0 or s.retries < 0:
        raise ConfigError("serve.batch_wait_timeout_s and serve.retries must be >= 0")
    if s.max_replicas < s.replicas:
        raise ConfigError(f"serve.max_replicas ({s.max_replicas}) must be >= serve.replicas "
                          f"({s.replicas})")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serve.port must be in 0..65535, got {s.port}")


def _validate_anchors(cfg: Config) -> None:
    """``loss.anchors=local`` needs a gathered contrastive loss."""
    if cfg.loss.anchors == "local":
        if cfg.train.task != "dual_encoder" or cfg.loss.kind == "none":
            raise ConfigError("loss.anchors=local splits a contrastive loss's anchors over the "
                              "workers; this run has none (train.task="
                              f"{cfg.train.task}, loss.kind={cfg.loss.kind}): leave "
                              "loss.anchors=auto")
        if not cfg.loss.global_negatives:
            raise ConfigError("loss.anchors=local scores each worker's anchors against the "
                              "gathered batch: set loss.global_negatives=true or leave "
                              "loss.anchors=auto")


def _validate_embed_chunk(cfg: Config) -> None:
    """``train.embed_chunk`` (GradCache): a row count within the batch, on a model whose chunks
    are independent and a DeepSpeed setup that reduces gradients once, after the last chunk."""
    chunk, batch, t = cfg.train.embed_chunk, cfg.train.batch_size, cfg.train
    if chunk == 0:
        return
    if not 0 < chunk <= batch:
        raise ConfigError(f"train.embed_chunk is {chunk}: set 0 (off) or a row count from 1 to "
                          f"the per-worker batch train.batch_size={batch}")
    if t.task != "dual_encoder":
        raise ConfigError(f"train.embed_chunk (GradCache) chunks the dual encoder's batch; "
                          f"train.task={t.task} has no such step: set train.embed_chunk=0")
    if t.zero_stage >= 2:
        raise ConfigError(f"train.embed_chunk re-encodes the batch chunk by chunk, each with its "
                          f"own backward; ZeRO stage {t.zero_stage} reduces gradients inside "
                          "every backward: set train.zero_stage to 0 or 1, or train.embed_chunk=0")
    if t.precision == "fp16":
        raise ConfigError("train.embed_chunk with train.precision=fp16 would apply the loss scale "
                          "twice (loss, then chunks): use bf16 or fp32, or train.embed_chunk=0")
    for tower in ("image", "text"):
        if cfg.get(f"model.{tower}.input_norm") == "batchnorm" or \
                cfg.get(f"model.{tower}.kind") == "cnn":
            raise ConfigError(f"train.embed_chunk with model.{tower} (BatchNorm): a chunk's batch "
                              "statistics are not the batch's, so the chunked step is another "
                              f"step; use an MLP/transformer tower without BatchNorm or set "
                              "train.embed_chunk=0")


def _validate_group_size(cfg: Config) -> None:
    size = cfg.data.group_size
    if size < 0:
        raise ConfigError(f"data.group_size must be >= 0 (0 = rows batched freely, N = the rows "
                          f"of one shard group in one batch, at most N of them), got {size}")
    if size and (cfg.data.kind != "images" or cfg.train.task != "dual_encoder"):
        raise ConfigError("data.group_size batches the image shards' groups for the dual "
                          "encoder: it needs data.kind=images and train.task=dual_encoder "
                          "(or set data.group_size=0)")


def _validate_hard_negatives(cfg: Config) -> None:
    hard = cfg.data.hard_negatives
    if hard.kind == "none":
        return
    if not 1 <= hard.k < cfg.train.batch_size:
        raise ConfigError(f"data.hard_negatives.k is {hard.k}: each caption gets k perturbed "
                          f"captions beside the batch's {cfg.train.batch_size} "
                          f"(train.batch_size), so 1 <= k <= {cfg.train.batch_size - 1}")
    if cfg.data.kind != "images" or cfg.loss.kind != "infonce" or cfg.train.task != "dual_encoder":
        raise ConfigError("data.hard_negatives perturbs captions for the InfoNCE loss of the dual "
                          "encoder: it needs data.kind=images, loss.kind=infonce and "
                          "train.task=dual_encoder (or set data.hard_negatives.kind=none)")


def validate(cfg: Config) -> None:
    """Checks across keys and of ranges (choices are checked by their Literal types)."""
    _validate_serve(cfg.serve)
    positive = ["train.num_workers", "train.batch_size", "train.grad_accum", "train.epochs",
                "model.embed_dim", "data.image_size", "data.max_text_len"]
    for key in positive:
        if cfg.get(key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {cfg.get(key)}")
    for key in ("data.reserved_cpus", "data.prefetch_batches", "data.shuffle_buffer"):
        if cfg.get(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {cfg.get(key)}")
    for name, amount in cfg.train.worker_resources.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            raise ConfigError(f"train.worker_resources.{name} must be a number >= 0, got {amount!r}")
    _validate_hard_negatives(cfg)
    _validate_group_size(cfg)
    if cfg.loss.margin < 0:
        raise ConfigError(f"loss.margin must be >= 0, got {cfg.loss.margin}")
    warm = cfg.loss.mh_warmup
    if warm.tau < 0:
        raise ConfigError(f"loss.mh_warmup.tau must be >= 0 (0 = plain MH), got {warm.tau}")
    if not 0.0 <= warm.start <= warm.end <= 1.0:
        raise ConfigError(f"loss.mh_warmup needs 0 <= start <= end <= 1 (fractions of the run), "
                          f"got start {warm.start}, end {warm.end}")
    if cfg.data.kind == "features":
        for tower in ("image", "text"):
            if cfg.get(f"model.{tower}.kind") != "mlp":
                raise ConfigError(
                    f"data.kind=features needs MLP towers: set model.{tower}.kind=mlp"
                )
    if cfg.model.retrieval_space == "label" and cfg.model.num_classes <= 0:
        raise ConfigError("model.retrieval_space=label ranks by class posteriors: set "
                          "model.num_classes to the class count (and train the classifier, "
                          "loss.dscmr.enabled=true), or use model.retrieval_space=common")
    if cfg.model.label_temperature <= 0:
        raise ConfigError(f"model.label_temperature must be > 0, got {cfg.model.label_temperature}")
    distill = cfg.loss.distill
    if distill.enabled:
        if bool(distill.feature_teacher) == bool(distill.slow):
            raise ConfigError(
                "loss.distill.enabled needs one teacher: loss.distill.feature_teacher=DIR (feature "
                "shards, a directory written by `raycmr teacher --checkpoint CKPT --out DIR`) "
                "or loss.distill.slow=CKPT (image shards, a checkpoint of `raycmr train "
                "--config quickstart_slow`)" + (", not both" if distill.feature_teacher else ""))
        if distill.feature_teacher and cfg.data.kind != "features":
            raise ConfigError("loss.distill.feature_teacher scores batch pairs over stored image "
                              "feature vectors: it needs data.kind=features (on image shards use "
                              "loss.distill.slow=CKPT, the captioning slow model)")
        if distill.slow:
            if cfg.data.kind != "images":
                raise ConfigError("loss.distill.slow computes the slow model's phi(x) from the "
                                  "batch's pixels: it needs data.kind=images")
            if cfg.train.task != "dual_encoder":
                raise ConfigError("loss.distill.slow distils into the dual encoder: it needs "
                                  "train.task=dual_encoder")
            m, b = distill.hard_negatives, cfg.train.batch_size
            if not 1 <= m < b:
                raise ConfigError(
                    f"loss.distill.hard_negatives is {m}: each caption's candidates are its "
                    f"image and m other images of the worker's batch of train.batch_size={b}, "
                    f"so 1 <= m <= {b - 1}")
        if distill.temperature <= 0:
            raise ConfigError(f"loss.distill.temperature must be > 0, got {distill.temperature}")
        if not 0.0 <= distill.start < 1.0:
            raise ConfigError(f"loss.distill.start is a fraction of the run's optimizer steps: "
                              f"0 <= start < 1, got {distill.start}")
    _validate_anchors(cfg)
    if cfg.loss.grl.disc_lr_scale <= 0:
        raise ConfigError(f"loss.grl.disc_lr_scale must be > 0 (the discriminator's learning rate "
                          f"= train.lr * it), got {cfg.loss.grl.disc_lr_scale}")
    if not 0.0 <= cfg.loss.grl.label_smoothing < 1.0:
        raise ConfigError(f"loss.grl.label_smoothing must be in [0, 1) (0 = hard targets), got "
                          f"{cfg.loss.grl.label_smoothing}")
    _validate_embed_chunk(cfg)
    if cfg.loss.dscmr.enabled and cfg.model.num_classes <= 0:
        raise ConfigError("loss.dscmr.enabled needs labels: set model.num_classes to the class count")
