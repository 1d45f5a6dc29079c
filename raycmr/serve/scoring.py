"""Pure functions of the retrieval service: query batches -> embeddings, (query, candidates)
-> reranker scores, the two stages' hits -> the response. No Ray, no HTTP: the deployments
(:mod:`raycmr.serve.deployments`) call these, and tests check them directly.

Fast and slow stages as in Miech et al., "Thinking Fast and Slow" (CVPR 2021): the dual encoder's
dot product ranks the whole gallery, a slow model reorders the best ``rerank_k`` candidates.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np


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
    """Retrieval embeddings [Q, d] of encoded images (JPEG/PNG bytes) by a dual encoder's image
    tower, decoded and centre-cropped as for evaluation. Raises ``ValueError`` on bytes that are no image."""
    import torch

    from raycmr.data.transforms import decode_image

    pixels = []
    for data in images:
        try:
            pixels.append(decode_image(data, image_size)[0])
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise ValueError(f"not a decodable image ({type(exc).__name__})") from None
    with torch.no_grad():
        pixel_values = torch.from_numpy(np.stack(pixels)).to(device)
        emb = model.retrieval_embed_image({"pixel_values": pixel_values})
    return emb.float().cpu().numpy()


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, best first (ties: lower index first)."""
    return np.argsort(-scores, kind="stable")[:k].tolist()


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


def merge_stages(hits: list[tuple[int, str, float]], scores: list[float] | None,
                 k: int, fast_weight: float = 0.0) -> list[dict[str, Any]]:
    """The response: the first ``len(scores)`` hits reordered by reranker score (stable for
    ties), then the remaining hits in retrieval order; the first ``k`` of them. A residual
    reranker's score is ``slow + fast_weight * retrieval score``.

    Each result: ``id``, ``score`` (of its stage), ``stage`` (``"rerank"``/``"retrieve"``),
    ``fast_score`` (the retrieval inner product), ``fast_rank`` (its 1-based place in the
    retrieval order; the rank change is ``fast_rank`` minus the result's place) and, for
    reranked results, ``rerank_score``.
    """
    n = len(scores) if scores is not None else 0
    if n and fast_weight:
        scores = [s + fast_weight * h[2] for s, h in zip(scores, hits)]
    order = sorted(range(n), key=lambda i: -scores[i]) if n else []
    out = [{"id": hits[i][1], "score": float(scores[i]), "stage": "rerank",
            "fast_score": float(hits[i][2]), "fast_rank": i + 1,
            "rerank_score": float(scores[i])} for i in order]
    out += [{"id": h[1], "score": float(h[2]), "stage": "retrieve", "fast_score": float(h[2]),
             "fast_rank": n + j + 1} for j, h in enumerate(hits[n:])]
    return out[:k]
