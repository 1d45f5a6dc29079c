"""The Serve deployments of the retrieval service (see :mod:`raycmr.serve.app`).

    HTTP -> Ingress (FastAPI: auth, limits, the page) -> QueryEncoder (batched text tower)
                                                      -> Retriever    (batched FAISS top_k)
                                                      -> SlowScorer     (batched (query, candidates)
                                                                       -> slow scores h(x, y))
                                                      -> Gallery      (thumbnails, image -> text)
                                                      -> StageLog     (ms per stage, app-wide)

Each deployment is built from one :class:`~raycmr.serve.plan.ServePlan`; the arithmetic lives in
:mod:`raycmr.serve.scoring`. The Ingress retries a search whose downstream replica died (every
search is idempotent), so losing one replica of a deployment with two costs latency, not errors.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model from the route
# functions' annotations at runtime.
import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from raycmr import artifacts
from raycmr.serve.plan import ServePlan
from raycmr.serve.scoring import (
    BatchStats,
    StageTimes,
    encode_images,
    encode_queries,
    merge_stages,
    slow_scores,
    top_k,
)

logger = logging.getLogger("ray.serve")


def _device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _load_model(plan: ServePlan):
    model, cfg = artifacts.load_exported(plan.checkpoint)
    return model.to(_device(plan.serve.use_gpu)).eval(), cfg


def _set_batching(method, plan: ServePlan) -> None:
    method.set_max_batch_size(plan.serve.max_batch_size)
    method.set_batch_wait_timeout_s(plan.serve.batch_wait_timeout_s)


@serve.deployment
class QueryEncoder:
    """Text queries -> L2-normalised embeddings with the checkpoint's text tower (batched)."""

    def __init__(self, plan: ServePlan):
        from raycmr.data.text import load_text_encoder

        self.device = _device(plan.serve.use_gpu)
        self.model, cfg = _load_model(plan)
        self.max_len = cfg.data.max_text_len
        features = plan.query_input == "text_feat"
        self.tokenize = None if features else load_text_encoder(cfg.data.tokenizer)
        _set_batching(self.encode, plan)
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
        _set_batching(self.search, plan)
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
class SlowScorer:
    """The slow stage: ``(text query, candidate gallery rows) -> h(x, y) per row`` (batched
    across requests). The slow model (Miech et al. 2021) reads each candidate's phi(x) from the
    index's phi store (memory-mapped, computed at index time), never the image itself."""

    def __init__(self, plan: ServePlan):
        from raycmr.data.text import load_text_encoder
        from raycmr.index.phi_store import PhiStore

        self.device = _device(plan.serve.use_gpu)
        model, cfg = artifacts.load_slow_exported(plan.slow_checkpoint)
        self.model = model.to(self.device).eval()
        self.phi = PhiStore(plan.index_path)
        self.tokenize = load_text_encoder(cfg.data.tokenizer)
        self.max_len = cfg.data.max_text_len
        _set_batching(self.score, plan)
        self.stats = BatchStats()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, queries: list[dict[str, Any]],
                    rows: list[list[int]]) -> list[list[float]]:
        """Per request: a query and its candidate gallery rows -> h(x, y) per row."""
        t0 = time.perf_counter()
        out = slow_scores(self.model, self.phi.get, queries, rows, self.tokenize, self.max_len,
                          self.device)
        self.stats.add(len(queries), time.perf_counter() - t0)
        return out

    def get_stats(self) -> dict[str, Any]:
        """Batch sizes this replica ran and its milliseconds per batch."""
        return self.stats.summary()


@serve.deployment
class Gallery:
    """The gallery's images (thumbnails) and image -> text search over its captions: every
    caption embedded once by the text tower at start, an uploaded image by the image tower."""

    def __init__(self, plan: ServePlan):
        from raycmr.data.text import load_text_encoder
        from raycmr.serve.gallery import GalleryStore

        self.store = GalleryStore.scan(plan.shards)
        self.device = _device(plan.serve.use_gpu)
        self.model, cfg = _load_model(plan)
        self.image_size = cfg.data.image_size
        tokenize = load_text_encoder(cfg.data.tokenizer)
        texts = [{"text": c} for _, c in self.store.captions]
        chunks = [encode_queries(self.model, texts[i:i + 256], tokenize,
                                 cfg.data.max_text_len, self.device)
                  for i in range(0, len(texts), 256)]
        self.caption_emb = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)

    def image(self, image_id: str) -> bytes | None:
        """Encoded bytes of one gallery image (None: not in the gallery)."""
        return self.store.image(image_id)

    def captions_for(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """The ``k`` captions closest to an encoded image (``ValueError``: not an image)."""
        emb = encode_images(self.model, [data], self.image_size, self.device)[0]
        scores = self.caption_emb @ emb
        return [{"id": self.store.captions[i][0], "caption": self.store.captions[i][1],
                 "score": float(scores[i])} for i in top_k(scores, k)]


def replica_died(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says a replica actor died or is unreachable."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    while exc is not None:
        if isinstance(exc, (RayActorError, ActorUnavailableError)):
            return True
        exc = exc.__cause__
    return False


async def with_retries(call, retries: int, what: str):
    """``await call()``, again up to ``retries`` times (50 ms, 100 ms, ... apart) when a
    downstream replica died; Serve routes the next attempt to a live replica."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == retries or not replica_died(exc):
                raise
            logger.warning("%s: a replica died (%s); retry %d of %d", what,
                           type(exc).__name__, attempt + 1, retries)
            await asyncio.sleep(0.05 * 2 ** attempt)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class StageLog:
    """Milliseconds per stage of the application's searches, whichever Ingress replica ran
    them: one replica, so ``GET /stats`` reads the same record whichever Ingress answers it."""

    def __init__(self) -> None:
        self.times = StageTimes()

    def add(self, times: dict[str, float]) -> None:
        self.times.add(times)

    def summary(self) -> dict[str, dict[str, float]]:
        return self.times.summary()


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP front: auth, limits, request checks; chains encoder -> retriever -> slow scorer."""

    def __init__(self, encoder: DeploymentHandle, retriever: DeploymentHandle,
                 slow: DeploymentHandle | None, gallery: DeploymentHandle | None,
                 stage_log: DeploymentHandle, plan: ServePlan):
        self.encoder, self.retriever = encoder, retriever
        self.slow, self.gallery = slow, gallery
        self.stage_log = stage_log
        self.plan = plan

    def __serve_build_asgi_app__(self):
        from raycmr.serve.http import make_api
        from raycmr.serve.traffic import TrafficRecorder

        api = make_api(self, self.plan)
        api.add_middleware(TrafficRecorder)  # outermost: raycmr serve's status line
        return api

    async def search(self, query: dict[str, Any], k: int, rerank_k: int, beta: float
                     ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Top ``k`` results of a checked query, its fast top ``rerank_k`` re-ranked by
        ``h + beta * fast`` (0: none), and the seconds each stage took."""
        plan = self.plan
        times: dict[str, float] = {}

        async def attempt():
            t0 = time.perf_counter()
            emb = await self.encoder.encode.remote(query)
            t1 = time.perf_counter()
            hits = await self.retriever.search.remote(emb)
            t2 = time.perf_counter()
            times.update(encode=t1 - t0, retrieve=t2 - t1)
            scores = None
            if rerank_k and self.slow is not None and hits:
                head = [h[0] for h in hits[:rerank_k]]
                scores = await self.slow.score.remote(query, head)
                times["rerank"] = time.perf_counter() - t2
            return hits, scores

        hits, scores = await with_retries(attempt, plan.serve.retries, "search")
        await self._log_times({**times, "fast": times["encode"] + times["retrieve"],
                               "total": sum(times.values())})
        return merge_stages(hits, scores, k, beta), times

    async def _log_times(self, times: dict[str, float]) -> None:
        """Adds one search's stage times to the app-wide record; a lost record costs /stats one
        search, never the search itself."""
        try:
            await self.stage_log.add.remote(times)
        except Exception as exc:  # noqa: BLE001 - the answer is ready; the record is optional
            logger.warning("stage times not recorded: %s", exc)

    async def stats(self) -> dict[str, Any]:
        """Milliseconds per stage of the application's recent searches (``encode`` +
        ``retrieve`` = the fast stage, ``rerank`` = the slow one) and the batch-size summaries
        of one replica of each batched deployment (``encoder``, ``retriever``, ``slow``)."""
        out = {"stages": await self.stage_log.summary.remote(),
               "encoder": await self.encoder.get_stats.remote(),
               "retriever": await self.retriever.get_stats.remote()}
        if self.slow is not None:
            out["slow"] = await self.slow.get_stats.remote()
        return out
