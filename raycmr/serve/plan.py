"""The Serve application's plan: every argument and file checked on the driver, before any Ray
work, into one :class:`ServePlan` that the deployments are built from.

A mistake (a missing checkpoint or index file, an index of another model, a slow checkpoint
whose phi(x) the index does not store, auth on without a token) raises :class:`ConfigError`
with one line naming the fix. Paths may be local or ``s3://``/``gs://`` URIs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raycmr import artifacts
from raycmr.config import ConfigError, ServeConfig, config_from_dict

INDEX_FILES = artifacts.INDEX_FILES
CHECKPOINT_FILES = artifacts.CHECKPOINT_FILES

# Locations (local paths or object-store URIs) are read through raycmr.artifacts.
is_remote, join, read_text, read_bytes = (artifacts.is_remote, artifacts.join, artifacts.read_text,
                                          artifacts.read_bytes)
_exists, _require, local_dir = artifacts.exists, artifacts.require, artifacts.local_dir


# -------------------------------------------------------------------------------------- plan


@dataclass
class ServePlan:
    """Everything the deployments need, checked on the driver before anything is deployed."""

    serve: ServeConfig  # the validated settings (no secret in it: the token is hashed below)
    checkpoint: str  # resolved checkpoint dir
    slow_checkpoint: str  # the slow model whose phi(x) the index stores; "" = no slow stage
    query_input: str  # "text" or "text_feat"
    text_dim: int  # text_feat length (0 for text)
    tokenizer: str
    max_text_len: int
    image_size: int
    count: int
    index_kind: str
    data_kind: str  # the gallery's shards: "images" (image bytes + captions) or "features"
    shards: list[str] = field(default_factory=list)  # the gallery's shard paths
    token_sha256: str = ""  # hex digest of the bearer token; "" = no auth
    session_key: str = ""  # signs the page's session cookies (random per plan; see sessions.py)
    gallery_note: str = ""  # why thumbnails and image -> text are off ("" = on, or features)
    slow_note: str = ""  # why there is no slow stage ("" = there is one, or it was turned off)
    index_note: str = ""  # the index's kind, parameters and build-time measurements

    @property
    def index_path(self) -> str:
        return self.serve.index_path

    @property
    def top_k(self) -> int:
        return self.serve.top_k

    @property
    def rerank_k(self) -> int:
        """Candidates re-ranked by default (0 without a slow stage)."""
        return self.serve.rerank_k if self.slow_checkpoint else 0

    @property
    def max_rerank_k(self) -> int:
        """The most candidates a request may have re-ranked."""
        return min(self.serve.max_rerank_k, self.serve.top_k) if self.slow_checkpoint else 0

    @property
    def beta(self) -> float:
        return self.serve.beta

    @property
    def has_images(self) -> bool:
        """The gallery's shards hold image bytes (thumbnails) and captions (image->text) and
        can be read."""
        return self.data_kind == "images" and not self.gallery_note


def serve_config(args: dict[str, Any] | ServeConfig | None) -> ServeConfig:
    """Builder ``args`` (ServeConfig keys) as a validated :class:`ServeConfig`."""
    if isinstance(args, ServeConfig):
        args = dataclasses.asdict(args)
    args = dict(args or {})
    fields = set(ServeConfig.__dataclass_fields__)
    unknown = sorted(set(args) - fields)
    if "reranker" in unknown:
        raise ConfigError("serve arg 'reranker' is gone (the one-vector reranker is retired): "
                          "the slow stage is a slow-model checkpoint whose phi(x) the index "
                          "stores; build the index with `raycmr index --slow SLOW` and set "
                          "slow_checkpoint (default: the index's) or slow_checkpoint=none")
    if unknown:
        raise ConfigError(f"unknown serve arg(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(fields))}")
    return config_from_dict({"serve": args}).serve


def read_token(cfg: ServeConfig, environ: dict[str, str] | None = None) -> str:
    """The bearer token: the environment variable ``cfg.token_env``, else ``cfg.token_file``;
    ``""`` when ``cfg.auth`` is ``"none"``. Auth on without a token is a :class:`ConfigError`."""
    if cfg.auth == "none":
        return ""
    environ = os.environ if environ is None else environ
    token = environ.get(cfg.token_env, "").strip() if cfg.token_env else ""
    if not token and cfg.token_file:
        try:
            token = read_text(cfg.token_file).strip()
        except (OSError, ConfigError) as exc:
            raise ConfigError(f"serve token_file '{cfg.token_file}' cannot be read ({exc}); "
                              "give a readable file holding the token") from None
        if not token:
            raise ConfigError(f"serve token_file '{cfg.token_file}' is empty")
    if not token:
        raise ConfigError(f"serve auth is on but no token was given: set the environment variable "
                          f"{cfg.token_env} or serve token_file, or auth=none to turn the check "
                          "off")
    if len(token) < 16:
        raise ConfigError("the serve token is shorter than 16 characters; use a long random one, "
                          "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`")
    return token


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token ("" for none): replicas keep only this."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


def _resolve_checkpoint(uri: str) -> str:
    if not uri:
        raise ConfigError("serve arg 'checkpoint' is empty: give the checkpoint dir the index "
                          "was built with")
    if is_remote(uri):
        _require(uri, CHECKPOINT_FILES, "checkpoint", "give a checkpoint dir written by training")
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ConfigError(f"checkpoint '{uri}' does not exist; give a checkpoint dir (holding "
                          "model.pt) or a run dir")
    return artifacts.find_checkpoint(path)


def plan_app(args: dict[str, Any] | ServeConfig | None, token: str | None = None) -> ServePlan:
    """Validate builder ``args`` and the files they name; :class:`ConfigError` on a mistake.

    ``token`` (the bearer token) defaults to :func:`read_token` of the settings.
    """
    cfg = serve_config(args)
    token = read_token(cfg) if token is None else token
    checkpoint = _resolve_checkpoint(cfg.checkpoint)
    model_cfg = artifacts.read_config(checkpoint)
    index_path = cfg.index_path
    if not index_path:
        raise ConfigError("serve arg 'index_path' is empty: build one with `raycmr index`")
    _require(index_path, INDEX_FILES, "index directory",
             "build one with `raycmr index --checkpoint CKPT --out DIR`")
    meta = artifacts.read_index_meta(index_path)
    gallery = artifacts.read_gallery(index_path)
    from raycmr.models.dual_encoder import retrieval_dim

    dim = retrieval_dim(model_cfg.model)
    if meta["dim"] != dim:
        raise ConfigError(
            f"index '{index_path}' holds {meta['dim']}-d vectors but checkpoint '{checkpoint}' "
            f"embeds to {dim}-d (retrieval_space {model_cfg.model.retrieval_space}); rebuild the "
            "index with this checkpoint"
        )
    features = model_cfg.model.text.kind == "mlp"
    plan = ServePlan(
        serve=cfg, checkpoint=checkpoint, slow_checkpoint="",
        query_input="text_feat" if features else "text",
        text_dim=model_cfg.model.text.input_dim if features else 0,
        tokenizer=model_cfg.data.tokenizer, max_text_len=model_cfg.data.max_text_len,
        image_size=model_cfg.data.image_size, count=int(meta["count"]),
        index_kind=str(meta["kind"]),
        data_kind=str(gallery.get("data_kind", model_cfg.data.kind)),
        shards=[str(s) for s in gallery.get("shards", [])],
        token_sha256=token_digest(token), session_key=secrets.token_hex(32) if token else "",
    )
    from raycmr.index.autotune import describe_index

    plan.index_note = describe_index(meta)
    plan.slow_checkpoint, plan.slow_note = _resolve_slow(cfg.slow_checkpoint, plan, gallery)
    if plan.data_kind == "images":
        plan.gallery_note = _check_gallery_shards(plan.shards)
    return plan


def _check_gallery_shards(shards: list[str]) -> str:
    """"" when the gallery's image shards can be read, else why not (search still works)."""
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError, check_shards

    try:
        check_shards(shards, "images")
    except (ShardReadError, ShardSchemaError) as exc:
        return (f"the gallery's shards cannot be read ({exc}); the page shows no thumbnails "
                "and image -> text search is off")
    return ""


def _resolve_slow(arg: str, plan: ServePlan, gallery: dict[str, Any]) -> tuple[str, str]:
    """``(slow checkpoint or "" for none, why none)``: ``arg`` (a slow checkpoint; "" = the one
    the index's phi store was computed with; "none" = off), checked against that store."""
    from raycmr.index.phi_store import has_phi, read_phi_meta, weights_digest

    if arg.lower() == "none" or plan.serve.rerank_k == 0:
        return "", ""
    rebuild = (f"build the index with `raycmr index --checkpoint {plan.checkpoint} --slow SLOW "
               "--out DIR`")
    if plan.data_kind != "images":
        if arg:
            raise ConfigError(f"serve slow_checkpoint is set but index '{plan.index_path}' is a "
                              f"{plan.data_kind} gallery: the slow model reads images; pass "
                              "slow_checkpoint=none")
        return "", f"a {plan.data_kind} gallery has no slow stage (it reads images)"
    if not has_phi(plan.index_path):
        if arg:
            raise ConfigError(f"index '{plan.index_path}' stores no phi(x) for the slow stage; "
                              f"{rebuild}, or pass slow_checkpoint=none")
        return "", f"index '{plan.index_path}' stores no phi(x): no slow stage ({rebuild})"
    meta = read_phi_meta(plan.index_path)
    uri = arg or meta["checkpoint"]
    if not _exists(uri):
        raise ConfigError(f"slow checkpoint '{uri}' does not exist; give the slow checkpoint "
                          f"the index was built with (slow_checkpoint=...), or {rebuild}")
    uri = artifacts.find_checkpoint(uri)
    slow_cfg = artifacts.read_config(uri)
    if slow_cfg.train.task != "slow":
        raise ConfigError(f"'{uri}' is a {slow_cfg.train.task} checkpoint, not a slow model: give "
                          "a checkpoint of `raycmr train --config quickstart_slow`")
    if meta.get("weights_sha256") and weights_digest(uri) != meta["weights_sha256"]:
        raise ConfigError(f"index '{plan.index_path}' stores phi(x) of another slow model "
                          f"({meta['checkpoint']}) than '{uri}'; serve with that one or {rebuild}")
    if meta["count"] != plan.count:
        raise ConfigError(f"index '{plan.index_path}' has {plan.count} images but phi(x) of "
                          f"{meta['count']}; {rebuild}")
    return uri, ""
