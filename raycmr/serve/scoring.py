"""Pure functions of the retrieval service: query batches -> embeddings, (query, candidates)
-> slow scores, the two stages' hits -> the response. No Ray, no HTTP: the deployments
(:mod:`raycmr.serve.deployments`) call these, and tests check them directly.

Fast and slow stages as in Miech et al., "Thinking Fast and Slow" (CVPR 2021): the dual encoder's
dot product ``f(x)^T g(y)`` ranks the whole gallery, the slow model's caption log-likelihood
``h(x, y)`` (:class:`raycmr.models.slow.SlowModel`, over the candidates' stored phi(x)) reorders
the best ``rerank_k`` by ``h + beta * f^T g``, exactly as ``raycmr eval --rerank`` ranks
(:func:`raycmr.evaluate.rerank.combine`, :func:`~raycmr.evaluate.rerank.rerank_order`).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np


class BatchStats:
    """Sizes of the batches one replica ran (for /stats and tests), and the seconds its batched
    work took when timed."""

    def __init__(self) -> None:
        self.sizes: collections.Counter[int] = collections.Counter()
        self.seconds = 0.0

    def add(self, n: int, seconds: float = 0.0) -> None:
        self.sizes[n] += 1
        self.seconds += seconds

    def summary(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        requests = sum(k * v for k, v in self.sizes.items())
        out = {"batches": batches, "requests": requests,
               "max_batch": max(self.sizes, default=0),
               "mean_batch": requests / batches if batches else 0.0,
               "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}
        if self.seconds:
            out["ms_per_batch"] = 1000 * self.seconds / batches
        return out


class StageTimes:
    """Milliseconds each stage of the searches took (the last ``keep`` searches per stage)."""

    def __init__(self, keep: int = 2000) -> None:
        self.times: dict[str, collections.deque[float]] = {}
        self.keep = keep

    def add(self, times: dict[str, float]) -> None:
        for stage, seconds in times.items():
            self.times.setdefault(stage, collections.deque(maxlen=self.keep)).append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """``stage -> {searches, mean_ms, p50_ms, p95_ms}``."""
        out = {}
        for stage, seconds in self.times.items():
            ms = 1000 * np.asarray(seconds)
            out[stage] = {"searches": len(ms), "mean_ms": float(ms.mean()),
                          "p50_ms": float(np.percentile(ms, 50)),
                          "p95_ms": float(np.percentile(ms, 95))}
        return out


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


def encode_images(model, images: list[bytes], image_size: int, device: str = "cpu"
                  ) -> np.ndarray:
    """Retrieval embeddings [Q, d] of encoded images (JPEG/PNG/WebP bytes) by a dual encoder's
    image tower, decoded and centre-cropped as for evaluation. Raises
    :class:`~raycmr.data.transforms.ImageRejected` on bytes that are over a limit or no image."""
    import torch

    from raycmr.data.transforms import ImageRejected, decode_image

    pixels = []
    for data in images:
        try:
            pixels.append(decode_image(data, image_size)[0])
        except ImageRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise ImageRejected(f"not a decodable image ({type(exc).__name__})", 422) from None
    with torch.no_grad():
        pixel_values = torch.from_numpy(np.stack(pixels)).to(device)
        emb = model.retrieval_embed_image({"pixel_values": pixel_values})
    return emb.float().cpu().numpy()


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, best first (ties: lower index first)."""
    return np.argsort(-scores, kind="stable")[:k].tolist()


def slow_scores(model, phi_of, queries: list[dict[str, Any]], rows: list[list[int]],
                tokenize, max_len: int, device: str = "cpu", chunk: int = 4096
                ) -> list[list[float]]:
    """h(x, y) of each text query against its own candidate gallery ``rows`` (ragged), the
    pairs of all queries through the decoders together (``chunk`` at most at once).
    ``phi_of(rows)`` returns the candidates' stored phi(x) ``[n, P, width]`` (float16)."""
    import torch

    flat = [r for rr in rows for r in rr]
    if not flat:
        return [[] for _ in rows]
    ids, mask = tokenize([q["text"] for q in queries], max_len)
    per_query = torch.tensor([len(rr) for rr in rows])
    ids = torch.from_numpy(ids).repeat_interleave(per_query, 0)
    mask = torch.from_numpy(mask).repeat_interleave(per_query, 0)
    memory = torch.from_numpy(np.asarray(phi_of(flat))).float()
    with torch.no_grad():
        scores = torch.cat([
            model.score(memory[s:s + chunk].to(device), ids[s:s + chunk].to(device),
                        mask[s:s + chunk].to(device)).float().cpu()
            for s in range(0, len(flat), chunk)]).tolist()
    out, start = [], 0
    for rr in rows:
        out.append(scores[start:start + len(rr)])
        start += len(rr)
    return out


def merge_stages(hits: list[tuple[int, str, float]], slow: list[float] | None,
                 k: int, beta: float = 0.0) -> list[dict[str, Any]]:
    """The response: the first ``len(slow)`` hits reordered by ``h + beta * fast`` (ties in
    retrieval order), then the remaining hits in retrieval order; the first ``k`` of them.

    Each result: ``id``, ``score`` (the final score: ``h + beta * fast`` for a reranked hit,
    the fast score for the others), ``stage`` (``"rerank"``/``"retrieve"``), ``fast_score``
    (the retrieval inner product f(x)^T g(y)), ``slow_score`` (h(x, y); None when not
    reranked) and ``fast_rank`` (its 1-based place in the retrieval order).
    """
    import torch

    from raycmr.evaluate.rerank import combine, rerank_order

    n = len(slow) if slow is not None else 0
    out = []
    if n:
        h = torch.tensor(slow, dtype=torch.float32)
        fast = torch.tensor([hit[2] for hit in hits[:n]], dtype=torch.float32)
        final = combine(h, fast, beta)
        for i in rerank_order(final).tolist():
            out.append({"id": hits[i][1], "score": float(final[i]), "stage": "rerank",
                        "fast_score": float(hits[i][2]), "slow_score": float(h[i]),
                        "fast_rank": i + 1})
    out += [{"id": h[1], "score": float(h[2]), "stage": "retrieve", "fast_score": float(h[2]),
             "slow_score": None, "fast_rank": n + j + 1} for j, h in enumerate(hits[n:])]
    return out[:k]
