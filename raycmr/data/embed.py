"""Distributed batch inference: embed a split with a trained dual encoder on Ray Data actors."""

from __future__ import annotations

from typing import Any

import numpy as np

from raycmr.config import Config


class _Embedder:
    """A Ray Data actor holding one copy of the encoder; maps a batch of decoded pairs to
    embeddings. The encoder travels as a state dict + config (no DeepSpeed needed)."""

    def __init__(self, cfg_dict: dict[str, Any], state_dict_ref, keep: tuple[str, ...] = ()):
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
        self.keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        valid = batch["valid"].astype(bool)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v[valid])) for k, v in batch.items()
                   if k in ("pixel_values", "input_ids", "attention_mask", "image_feat",
                            "text_feat")}
        with torch.no_grad():
            img_common, txt_common = self.model(tensors)
            img = self.model.to_retrieval(img_common, "image")
            txt = self.model.to_retrieval(txt_common, "text")
        out = {"img": img.numpy(), "txt": txt.numpy(), "img_common": img_common.numpy(),
               "group": batch["group"][valid], "label": batch["label"][valid]}
        out.update({k: batch[k][valid] for k in self.keep})
        return out


def embed_split(paths: list[str], cfg: Config, state_dict: dict, *, num_actors: int = 2,
                batch_size: int = 256, keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Embed every valid pair of the shards at ``paths``, on ``num_actors`` Ray Data actors.

    Returns arrays in one dict: ``img``, ``txt`` (retrieval vectors, see
    ``model.retrieval_space``), ``img_common`` (the common-space image embedding), ``group``,
    ``label``, and the decoded batch columns named in ``keep`` (e.g. ``input_ids``)."""
    import ray

    from raycmr.data.pipeline import build_dataset

    ds = build_dataset(paths, cfg.data, training=False)
    state_ref = ray.put(state_dict)
    embedded = ds.map_batches(
        _Embedder, fn_constructor_args=(cfg.to_dict(), state_ref, tuple(keep)),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors), batch_format="numpy",
    )
    names = ("img", "txt", "img_common", "group", "label", *keep)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for k, chunks in parts.items():
            chunks.append(batch[k])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
