"""Distributed batch inference: embed a split with a trained dual encoder on Ray Data actors."""

from __future__ import annotations

from typing import Any

import numpy as np

from raycmr.config import Config


class _Embedder:
    """A Ray Data actor holding one copy of the encoder; maps a batch of decoded pairs to
    embeddings. The encoder travels as a state dict + config (no DeepSpeed needed)."""

    def __init__(self, cfg_dict: dict[str, Any], state_dict_ref):
        import ray
        import torch

        from raycmr.config import config_from_dict
        from raycmr.models.dual_encoder import DualEncoder

        cfg = config_from_dict(cfg_dict)
        self.model = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
        if isinstance(state_dict_ref, ray.ObjectRef):
            state_dict_ref = ray.get(state_dict_ref)
        self.model.load_state_dict(state_dict_ref)
        self.model.eval()
        self.torch = torch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        valid = batch["valid"].astype(bool)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v[valid])) for k, v in batch.items()
                   if k in ("pixel_values", "input_ids", "attention_mask", "image_feat",
                            "text_feat")}
        with torch.no_grad():
            img, txt = self.model.retrieval_embed(tensors)
        return {"img": img.numpy(), "txt": txt.numpy(), "group": batch["group"][valid],
                "label": batch["label"][valid]}


def embed_split(paths: list[str], cfg: Config, state_dict: dict, *, num_actors: int = 2,
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """Embed every valid pair of the shards at ``paths``: ``img``, ``txt``, ``group``, ``label``
    arrays in one dict, computed by ``num_actors`` Ray Data actors."""
    import ray

    from raycmr.data.pipeline import build_dataset

    ds = build_dataset(paths, cfg.data, training=False)
    state_ref = ray.put(state_dict)
    embedded = ds.map_batches(
        _Embedder, fn_constructor_args=(cfg.to_dict(), state_ref), batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors), batch_format="numpy",
    )
    parts: dict[str, list[np.ndarray]] = {"img": [], "txt": [], "group": [], "label": []}
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for k, chunks in parts.items():
            chunks.append(batch[k])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
