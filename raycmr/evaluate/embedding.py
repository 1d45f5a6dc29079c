"""Embedding pairs with a trained dual encoder: one path for evaluation, the index, the
feature teacher's training pairs and DCKT's pair selection.

- :func:`encode_pairs`: the torch core (a batch of tensors -> image/text embeddings in the
  retrieval space of ``model.retrieval_space``, or the common space), shared by both paths;
- :func:`embed_batches`: in-process, over an iterator of tensor batches (validation inside a
  training worker);
- :class:`DualEncoderEmbedder` + :func:`embed_dataset` / :func:`embed_split` /
  :func:`embed_pairs`: distributed, on a Ray Data actor pool
  (:func:`raycmr.data.inference.run_batch_inference`); the encoder travels as a state dict +
  config (no DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch

from raycmr.config import Config

Space = Literal["retrieval", "common"]
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "image_feat", "text_feat")


def encode_pairs(model, batch: dict[str, torch.Tensor], space: Space = "retrieval"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(img, txt, img_common)``: the pairs' embeddings in ``space`` ("retrieval": see
    ``model.retrieval_space``; "common": the L2-normalised common space) and the common-space
    image embedding."""
    img_common, txt_common = model(batch)
    if space == "common":
        return img_common, txt_common, img_common
    return (model.to_retrieval(img_common, "image"), model.to_retrieval(txt_common, "text"),
            img_common)


@torch.no_grad()
def embed_batches(encoder, batches: Iterable[dict[str, torch.Tensor]],
                  space: Space = "retrieval") -> dict[str, np.ndarray]:
    """Embed every (image, caption) pair of ``batches`` in-process: ``img``, ``txt`` [N, d]
    float32, ``group``, ``label``."""
    parts: dict[str, list[np.ndarray]] = {"img": [], "txt": [], "group": [], "label": []}
    for batch in batches:
        img, txt, _ = encode_pairs(encoder, batch, space)
        parts["img"].append(img.float().cpu().numpy())
        parts["txt"].append(txt.float().cpu().numpy())
        parts["group"].append(batch["group"].cpu().numpy())
        parts["label"].append(batch["label"].cpu().numpy())
    if not parts["img"]:
        return {"img": np.zeros((0, 0), np.float32), "txt": np.zeros((0, 0), np.float32),
                "group": np.zeros(0, np.int64), "label": np.zeros(0, np.int64)}
    return {k: np.concatenate(v) for k, v in parts.items()}


class DualEncoderEmbedder:
    """A picklable model factory for :func:`~raycmr.data.inference.run_batch_inference`: called
    in an actor, it builds the dual encoder of ``cfg_dict`` with ``state`` (a state dict or its
    object ref) and returns a function from a decoded batch to ``img``, ``txt`` (in ``space``),
    ``img_common``, ``group``, ``label`` and the batch columns named in ``keep``, valid rows
    only. ``images_only``: the image tower alone, returning ``img`` and ``group`` (a gallery
    index needs nothing else, and the text tower would double its cost)."""

    def __init__(self, cfg_dict: dict[str, Any], state: Any, space: Space = "retrieval",
                 keep: tuple[str, ...] = (), images_only: bool = False):
        self.cfg_dict, self.state, self.space, self.keep = cfg_dict, state, space, tuple(keep)
        self.images_only = images_only

    def __call__(self):
        import ray

        from raycmr.config import config_from_dict
        from raycmr.models.dual_encoder import DualEncoder

        cfg = config_from_dict(self.cfg_dict)
        model = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
        state = ray.get(self.state) if isinstance(self.state, ray.ObjectRef) else self.state
        model.load_state_dict(state)
        model.eval()
        space, keep, images_only = self.space, self.keep, self.images_only

        @torch.no_grad()
        def embed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            valid = batch["valid"].astype(bool)
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v[valid]))
                       for k, v in batch.items() if k in MODEL_INPUTS}
            if images_only:
                img = model.retrieval_embed_image(tensors) if space == "retrieval" \
                    else model.encode_image(tensors)
                return {"img": img.float().numpy(), "group": batch["group"][valid]}
            img, txt, img_common = encode_pairs(model, tensors, space)
            out = {"img": img.float().numpy(), "txt": txt.float().numpy(),
                   "img_common": img_common.float().numpy(),
                   "group": batch["group"][valid], "label": batch["label"][valid]}
            out.update({k: batch[k][valid] for k in keep})
            return out

        return embed


def embed_dataset(ds: Any, cfg: Config, state_dict: dict, *, space: Space = "retrieval",
                  keep: tuple[str, ...] = (), num_actors: int = 2, batch_size: int = 256,
                  images_only: bool = False,
                  on_rows: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Embed every valid pair of a preprocessed Ray Data dataset (the columns of
    :func:`raycmr.data.pipeline.build_dataset`) on ``num_actors`` actors: ``img``, ``txt``
    (in ``space``), ``img_common``, ``group``, ``label`` and the columns in ``keep``
    (``images_only``: ``img`` and ``group``)."""
    import ray

    from raycmr.data.inference import run_batch_inference

    factory = DualEncoderEmbedder(cfg.to_dict(), ray.put(state_dict), space, keep, images_only)
    columns = ("img", "group") if images_only else \
        ("img", "txt", "img_common", "group", "label", *keep)
    return run_batch_inference(ds, factory, columns, num_actors=num_actors,
                               batch_size=batch_size, on_rows=on_rows)


def embed_split(paths: list[str], cfg: Config, state_dict: dict, *, num_actors: int = 2,
                batch_size: int = 256, keep: tuple[str, ...] = (),
                space: Space = "retrieval", images_only: bool = False,
                on_rows: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """:func:`embed_dataset` over the shards at ``paths`` (read with ``cfg.data``)."""
    from raycmr.data.pipeline import build_dataset

    ds = build_dataset(paths, cfg.data, training=False)
    return embed_dataset(ds, cfg, state_dict, space=space, keep=keep, num_actors=num_actors,
                         batch_size=batch_size, images_only=images_only, on_rows=on_rows)


def embed_pairs(spec, cfg: Config, state_dict: dict, *, num_actors: int = 2,
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """DCKT selection's embedding of one domain (:class:`raycmr.data.domains.DomainSpec`):
    common-space ``img``, ``txt`` [n, d], ``label``, ``pair_key`` [n], rows sorted by
    ``pair_key`` (independent of read order)."""
    from raycmr.data.domains import build_domain_dataset

    ds = build_domain_dataset(spec, cfg.data, training=False)
    emb = embed_dataset(ds, cfg, state_dict, space="common", keep=("pair_key",),
                        num_actors=num_actors, batch_size=batch_size)
    if len(emb["pair_key"]) == 0:
        raise ValueError(f"DCKT {spec.name} domain {spec.describe()} has no valid pairs to embed")
    order = np.argsort(emb["pair_key"], kind="stable")
    return {k: emb[k][order] for k in ("img", "txt", "label", "pair_key")}
