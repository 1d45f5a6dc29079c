"""The retrieval service: a Ray Serve application of four deployments.

    HTTP -> Ingress (FastAPI) -> QueryEncoder (batched: tokenizer + text tower)
                              -> Retriever    (batched: FAISS top_k over the gallery)
                              -> Reranker     (batched: cross-attention over the top rerank_k)

Fast and slow stages as in Miech et al., "Thinking Fast and Slow" (CVPR 2021): the dual encoder's
dot product ranks the whole gallery, the slow cross-attention model reorders the best
``rerank_k`` of the ``top_k`` retrieved. Endpoints (under the application's route prefix):

* ``POST /search`` ``{"text": "...", "k": 10}`` (or ``"text_feat": [...]`` for models whose text
  tower takes feature vectors; ``"rerank": false`` skips the slow stage) -> a JSON list of
  ``{"id", "score", "stage"}``, best first. ``stage`` is ``"rerank"`` (score = reranker score)
  for the reordered head and ``"retrieve"`` (score = inner product) for the rest.
* ``GET /healthz`` -> gallery size, index kind, query input, whether the reranker is on.
* ``GET /stats`` -> batch sizes seen by one replica of each batched deployment.

``build_app(args)`` is the application builder named by ``raycmr.serve.app:build_app`` in Serve
config files (``serve deploy``, KubeRay RayService). ``args`` are :class:`ServeConfig` keys
(``index_path``, ``checkpoint``, ``top_k``, ``rerank_k``, ``route_prefix``) plus the optional
``reranker`` (a directory written by ``raycmr reranker``; default ``INDEX/reranker`` when present,
``"none"`` turns the stage off), ``max_batch_size``, ``batch_wait_timeout_s`` and ``use_gpu``.
Paths may be local or ``s3://``/``gs://`` URIs (each replica copies what it needs to a local
temporary directory). ``route_prefix`` is applied by whoever runs the application
(``serve.run``/``raycmr serve``, or the config file's own ``route_prefix``).
"""

# No `from __future__ import annotations` here: FastAPI reads the request model from the route
# methods' annotations at runtime, and Serve's ingress wrapper cannot resolve string annotations.
import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from raycmr import artifacts
from raycmr.config import ConfigError, ServeConfig, config_from_dict

APP_NAME = "raycmr"
RERANKER_SUBDIR, INDEX_FILES = artifacts.RERANKER_SUBDIR, artifacts.INDEX_FILES
CHECKPOINT_FILES = artifacts.CHECKPOINT_FILES
EXTRA_ARGS: dict[str, Any] = {"reranker": "", "max_batch_size": 16,
                              "batch_wait_timeout_s": 0.01, "use_gpu": False}


# ------------------------------------------------------------------------------ paths and args


# Locations (local paths or object-store URIs) are read through raycmr.artifacts.
_is_remote, _join, _exists, _read_text = (artifacts.is_remote, artifacts.join, artifacts.exists,
                                          artifacts.read_text)
_require, local_dir = artifacts.require, artifacts.local_dir


@dataclass
class ServePlan:
    """Everything the deployments need, checked on the driver before anything is deployed."""

    checkpoint: str
    index_path: str
    reranker: str  # "" = no rerank stage
    top_k: int
    rerank_k: int
    max_batch_size: int
    batch_wait_timeout_s: float
    use_gpu: bool
    query_input: str  # "text" or "text_feat"
    text_dim: int  # text_feat length (0 for text)
    tokenizer: str
    max_text_len: int
    count: int
    index_kind: str
    rerank_fast_weight: float = 0.0  # residual reranker: + fast_weight * retrieval score


def _coerce_extra(key: str, value: Any) -> Any:
    default = EXTRA_ARGS[key]
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"serve arg '{key}' must be a {type(default).__name__}, got {value!r}"
        ) from None


def _resolve_checkpoint(uri: str) -> str:
    if not uri:
        raise ConfigError("serve arg 'checkpoint' is empty: give the checkpoint dir the index "
                          "was built with")
    if _is_remote(uri):
        _require(uri, CHECKPOINT_FILES, "checkpoint", "give a checkpoint dir written by training")
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ConfigError(f"checkpoint '{uri}' does not exist; give a checkpoint dir (holding "
                          "model.pt) or a run dir")
    return artifacts.find_checkpoint(path)


def plan_app(args: dict[str, Any]) -> ServePlan:
    """Validate builder ``args`` and the files they name; :class:`ConfigError` on a mistake."""
    args = dict(args or {})
    fields = set(ServeConfig.__dataclass_fields__)
    unknown = sorted(set(args) - fields - set(EXTRA_ARGS))
    if unknown:
        raise ConfigError(f"unknown serve arg(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(fields | set(EXTRA_ARGS)))}")
    serve_cfg = config_from_dict({"serve": {k: v for k, v in args.items() if k in fields}}).serve
    extra = {k: _coerce_extra(k, args.get(k, d)) for k, d in EXTRA_ARGS.items()}
    if serve_cfg.top_k <= 0:
        raise ConfigError(f"serve arg 'top_k' must be positive, got {serve_cfg.top_k}")
    if not 0 <= serve_cfg.rerank_k <= serve_cfg.top_k:
        raise ConfigError(f"serve arg 'rerank_k' must be in [0, top_k={serve_cfg.top_k}], got "
                          f"{serve_cfg.rerank_k}")
    if extra["max_batch_size"] <= 0 or extra["batch_wait_timeout_s"] < 0:
        raise ConfigError("serve args max_batch_size must be > 0 and batch_wait_timeout_s >= 0")

    checkpoint = _resolve_checkpoint(serve_cfg.checkpoint)
    cfg = artifacts.read_config(checkpoint)
    index_path = serve_cfg.index_path
    if not index_path:
        raise ConfigError("serve arg 'index_path' is empty: build one with `raycmr index`")
    _require(index_path, INDEX_FILES, "index directory",
             "build one with `raycmr index --checkpoint CKPT --out DIR`")
    meta = artifacts.read_index_meta(index_path)
    gallery = artifacts.read_gallery(index_path)
    from raycmr.models.dual_encoder import retrieval_dim

    dim = retrieval_dim(cfg.model)
    if meta["dim"] != dim:
        raise ConfigError(
            f"index '{index_path}' holds {meta['dim']}-d vectors but checkpoint '{checkpoint}' "
            f"embeds to {dim}-d (retrieval_space {cfg.model.retrieval_space}); rebuild the "
            "index with this checkpoint"
        )
    features = cfg.model.text.kind == "mlp"
    plan = ServePlan(
        checkpoint=checkpoint, index_path=index_path, reranker="", top_k=serve_cfg.top_k,
        rerank_k=serve_cfg.rerank_k, max_batch_size=extra["max_batch_size"],
        batch_wait_timeout_s=extra["batch_wait_timeout_s"], use_gpu=extra["use_gpu"],
        query_input="text_feat" if features else "text",
        text_dim=cfg.model.text.input_dim if features else 0,
        tokenizer=cfg.data.tokenizer, max_text_len=cfg.data.max_text_len,
        count=int(meta["count"]), index_kind=str(meta["kind"]),
    )
    plan.reranker, plan.rerank_fast_weight = _resolve_reranker(extra["reranker"], plan, gallery)
    return plan


def _resolve_reranker(arg: str, plan: ServePlan, gallery: dict[str, Any]) -> tuple[str, float]:
    """``(reranker directory or "" for none, its fast_weight)``, checked against the plan."""
    from raycmr.models.reranker import CONFIG_FILE, WEIGHTS_FILE, RerankerConfig

    if arg.lower() == "none" or plan.rerank_k == 0:
        return "", 0.0
    uri = arg or _join(plan.index_path, RERANKER_SUBDIR)
    if not arg and not _exists(_join(uri, WEIGHTS_FILE)):
        return "", 0.0  # no reranker next to the index: serve the fast stage only
    _require(uri, (WEIGHTS_FILE, CONFIG_FILE), "reranker",
             "write one with `raycmr reranker --checkpoint CKPT --out DIR`, or pass "
             "reranker=none")
    rcfg = RerankerConfig.from_dict(yaml.safe_load(_read_text(_join(uri, CONFIG_FILE))) or {})
    want = "features" if plan.query_input == "text_feat" else "tokens"
    if rcfg.query != want:
        raise ConfigError(f"reranker '{uri}' scores query {rcfg.query} but this model's queries "
                          f"are {plan.query_input}; train a reranker with query={want}")
    if want == "features" and rcfg.text_dim != plan.text_dim:
        raise ConfigError(f"reranker '{uri}' takes {rcfg.text_dim}-d text_feat, the model "
                          f"{plan.text_dim}-d")
    if rcfg.image_dim != gallery["rerank_dim"]:
        raise ConfigError(
            f"reranker '{uri}' takes {rcfg.image_dim}-d image vectors but index "
            f"'{plan.index_path}' stores {gallery['rerank_dim']}-d {gallery['rerank_features']}"
        )
    return uri, rcfg.fast_weight


# ------------------------------------------------------------------------------- deployments


class BatchStats:
    """Sizes of the batches one replica ran (for /stats and tests)."""

    def __init__(self) -> None:
        self.sizes: collections.Counter[int] = collections.Counter()

    def add(self, n: int) -> None:
        self.sizes[n] += 1

    def summary(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        requests = sum(k * v for k, v in self.sizes.items())
        return {"batches": batches, "requests": requests,
                "max_batch": max(self.sizes, default=0),
                "mean_batch": requests / batches if batches else 0.0,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


def _device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _query_batch(queries: list[dict[str, Any]], tokenize, max_len: int) -> dict[str, Any]:
    import torch

    if tokenize is None:
        return {"text_feat": torch.tensor(np.asarray([q["text_feat"] for q in queries],
                                                     dtype=np.float32))}
    ids, mask = tokenize([q["text"] for q in queries], max_len)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def encode_queries(model, queries: list[dict[str, Any]], tokenize, max_len: int,
                   device: str = "cpu") -> np.ndarray:
    """Embeddings [Q, d] of query dicts with a dual encoder's text tower: ``text_feat`` vectors
    when ``tokenize`` is None, else ``text`` strings tokenized to ``max_len``."""
    import torch

    batch = _query_batch(queries, tokenize, max_len)
    with torch.no_grad():
        emb = model.retrieval_embed_text({k: v.to(device) for k, v in batch.items()})
    return emb.float().cpu().numpy()


def rerank_scores(model, feats: np.ndarray, queries: list[dict[str, Any]],
                  rows: list[list[int]], tokenize, device: str = "cpu") -> list[list[float]]:
    """Reranker scores of each query against its own candidate gallery ``rows`` (ragged), all
    pairs of all queries in one forward pass; ``feats`` holds the stored image vectors."""
    import torch

    flat = [r for rr in rows for r in rr]
    if not flat:
        return [[] for _ in rows]
    query = _query_batch(queries, tokenize, model.cfg.max_text_len)
    index = torch.repeat_interleave(torch.arange(len(rows)),
                                    torch.tensor([len(rr) for rr in rows]))
    image = torch.from_numpy(np.asarray(feats[np.asarray(flat)], dtype=np.float32))
    with torch.no_grad():
        scores = model.score_pairs({k: v.to(device) for k, v in query.items()},
                                   image.to(device), index.to(device))
    scores = scores.float().cpu().tolist()
    out, start = [], 0
    for rr in rows:
        out.append(scores[start:start + len(rr)])
        start += len(rr)
    return out


@serve.deployment
class QueryEncoder:
    """Text queries -> L2-normalised embeddings with the checkpoint's text tower (batched)."""

    def __init__(self, plan: ServePlan):
        from raycmr.data.text import load_text_encoder
        self.device = _device(plan.use_gpu)
        model, cfg = artifacts.load_exported(plan.checkpoint)
        self.model = model.to(self.device).eval()
        self.features = plan.query_input == "text_feat"
        self.max_len = cfg.data.max_text_len
        self.tokenize = None if self.features else load_text_encoder(cfg.data.tokenizer)
        self.encode.set_max_batch_size(plan.max_batch_size)
        self.encode.set_batch_wait_timeout_s(plan.batch_wait_timeout_s)
        self.stats = BatchStats()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, queries: list[dict[str, Any]]) -> list[np.ndarray]:
        """One query dict (``text`` or ``text_feat``) per request -> one embedding each."""
        self.stats.add(len(queries))
        return list(encode_queries(self.model, queries, self.tokenize, self.max_len,
                                   self.device))

    def get_stats(self) -> dict[str, Any]:
        """Batch sizes this replica ran."""
        return self.stats.summary()


@serve.deployment
class Retriever:
    """FAISS inner-product search over the gallery: embedding -> top_k (row, id, score)."""

    def __init__(self, plan: ServePlan):
        from raycmr.index.faiss_index import load_index

        self.index, self.ids = load_index(plan.index_path)
        self.top_k = plan.top_k
        self.search.set_max_batch_size(plan.max_batch_size)
        self.search.set_batch_wait_timeout_s(plan.batch_wait_timeout_s)
        self.stats = BatchStats()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def search(self, embeddings: list[np.ndarray]) -> list[list[tuple[int, str, float]]]:
        """One embedding per request -> its hits, best first (missing slots dropped)."""
        from raycmr.index.faiss_index import search

        self.stats.add(len(embeddings))
        scores, rows = search(self.index, np.stack(embeddings), self.top_k)
        return [[(int(r), self.ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows.tolist(), scores.tolist())]

    def get_stats(self) -> dict[str, Any]:
        """Batch sizes this replica ran."""
        return self.stats.summary()


@serve.deployment
class Reranker:
    """Cross-attention scores of (query, candidate) pairs over the stored gallery vectors."""

    def __init__(self, plan: ServePlan):
        from raycmr.data.text import load_text_encoder
        from raycmr.models.reranker import load_reranker

        self.device = _device(plan.use_gpu)
        self.model = load_reranker(local_dir(plan.reranker)).to(self.device).eval()
        self.feats = artifacts.read_rerank_feats(plan.index_path)
        self.features = self.model.cfg.query == "features"
        self.tokenize = None if self.features else load_text_encoder(plan.tokenizer)
        self.score.set_max_batch_size(plan.max_batch_size)
        self.score.set_batch_wait_timeout_s(plan.batch_wait_timeout_s)
        self.stats = BatchStats()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, queries: list[dict[str, Any]],
                    rows: list[list[int]]) -> list[list[float]]:
        """Per request: a query and its candidate gallery rows -> one score per row."""
        self.stats.add(len(queries))
        return rerank_scores(self.model, self.feats, queries, rows, self.tokenize, self.device)

    def get_stats(self) -> dict[str, Any]:
        """Batch sizes this replica ran."""
        return self.stats.summary()


def merge_stages(hits: list[tuple[int, str, float]], scores: list[float] | None,
                 k: int, fast_weight: float = 0.0) -> list[dict[str, Any]]:
    """The response: the first ``len(scores)`` hits reordered by reranker score (stable for
    ties), then the remaining hits in retrieval order; the first ``k`` of them. A residual
    reranker's score is ``slow + fast_weight * retrieval score``."""
    n = len(scores) if scores is not None else 0
    if n and fast_weight:
        scores = [s + fast_weight * h[2] for s, h in zip(scores, hits)]
    order = sorted(range(n), key=lambda i: -scores[i]) if n else []
    out = [{"id": hits[i][1], "score": float(scores[i]), "stage": "rerank"} for i in order]
    out += [{"id": h[1], "score": float(h[2]), "stage": "retrieve"} for h in hits[n:]]
    return out[:k]


api = FastAPI(title="raycmr retrieval", description=__doc__)


class SearchRequest(BaseModel):
    """Body of ``POST /search``: exactly one of ``text`` and ``text_feat``."""

    text: str | None = None
    text_feat: list[float] | None = None
    k: int = Field(10, ge=1)
    rerank: bool = True


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP front: validates requests and chains encoder -> retriever -> reranker handles."""

    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle,
                 reranker: DeploymentHandle | None, plan: ServePlan):
        self.encoder, self.retriever, self.reranker = encoder, retriever, reranker
        self.plan = plan

    def _query(self, req: SearchRequest) -> dict[str, Any]:
        plan = self.plan
        if (req.text is None) == (req.text_feat is None):
            raise HTTPException(400, "give exactly one of 'text' and 'text_feat'")
        if req.k > plan.top_k:
            raise HTTPException(400, f"k={req.k} is more than this service's top_k={plan.top_k}")
        if plan.query_input == "text_feat":
            if req.text_feat is None:
                raise HTTPException(400, f"this model's text tower takes feature vectors: send "
                                         f"'text_feat' (a list of {plan.text_dim} numbers)")
            if len(req.text_feat) != plan.text_dim:
                raise HTTPException(400, f"'text_feat' has {len(req.text_feat)} values; this "
                                         f"model takes {plan.text_dim}")
            if not np.isfinite(np.asarray(req.text_feat, dtype=np.float64)).all():
                raise HTTPException(400, "'text_feat' holds NaN or inf")
            return {"text_feat": [float(v) for v in req.text_feat]}
        if req.text is None:
            raise HTTPException(400, "this model embeds text: send 'text' (a string)")
        if not req.text.strip():
            raise HTTPException(400, "'text' is empty")
        return {"text": req.text}

    @api.post("/search")
    async def search(self, req: SearchRequest) -> list[dict[str, Any]]:
        """Top ``k`` gallery ids for a query, reranked unless ``rerank`` is false."""
        query = self._query(req)
        # The encoder's response goes straight into the retriever call: Serve resolves it.
        hits = await self.retriever.search.remote(self.encoder.encode.remote(query))
        scores = None
        if req.rerank and self.reranker is not None and hits:
            head = [h[0] for h in hits[: self.plan.rerank_k]]
            scores = await self.reranker.score.remote(query, head)
        return merge_stages(hits, scores, req.k, self.plan.rerank_fast_weight)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness plus what this service answers with."""
        plan = self.plan
        return {"status": "ok", "gallery": plan.count, "index_kind": plan.index_kind,
                "query_input": plan.query_input, "top_k": plan.top_k,
                "rerank_k": plan.rerank_k if self.reranker is not None else 0,
                "reranker": self.reranker is not None}

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """Batch-size summaries of one replica of each batched deployment."""
        out = {"encoder": await self.encoder.get_stats.remote(),
               "retriever": await self.retriever.get_stats.remote()}
        if self.reranker is not None:
            out["reranker"] = await self.reranker.get_stats.remote()
        return out


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder (``raycmr.serve.app:build_app``); see the module docstring.

    Checks every path first and raises :class:`ConfigError` naming a missing or mismatched
    checkpoint, index or reranker before anything is deployed.
    """
    plan = plan_app(args)
    model_opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if plan.use_gpu else 0}
    batched = {"max_ongoing_requests": max(2 * plan.max_batch_size, 8)}
    encoder = QueryEncoder.options(ray_actor_options=model_opts, **batched).bind(plan)
    retriever = Retriever.options(ray_actor_options={"num_cpus": 1}, **batched).bind(plan)
    reranker = None
    if plan.reranker:
        reranker = Reranker.options(ray_actor_options=dict(model_opts), **batched).bind(plan)
    return Ingress.options(ray_actor_options={"num_cpus": 0.1},
                           max_ongoing_requests=64).bind(encoder, retriever, reranker, plan)

