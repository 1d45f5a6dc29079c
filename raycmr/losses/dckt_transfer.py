"""DCKT's two-level transfer terms (Huang & Peng, "Deep Cross-media Knowledge Transfer",
CVPR 2018), between a source-domain batch ``s`` and a target-domain batch ``t``.

For modality ``m`` in {img, txt}, the tower output ``f_m``, the projection ``p_m``, the shared
layers' output ``u_m`` and ``n(x) = x / ||x||``::

    media-level       sum_m sum_{l in {f, p}} MMD^2_u(n(l_m^s), n(l_m^t))
    correlation-level sum_m MMD^2_u(u_m^s, u_m^t)

``MMD^2_u`` is the unbiased multi-kernel Gaussian MMD (:func:`raycmr.losses.mmd.mmd2_unbiased`).
Layers are L2-normalised first so that the kernel bandwidths mean the same at every layer
(distances in [0, 2]). The inputs are dicts of layers keyed ``{m}_{tower,proj}`` and ``{m}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raycmr.losses.mmd import mmd2_unbiased

MEDIA_LAYERS = ("tower", "proj")


def media_mmd(src: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
              bandwidths: list[float]) -> torch.Tensor:
    """``sum_{m in img, txt} sum_{l in tower, proj} MMD^2_u(n(l_m^s), n(l_m^t))`` (float32)."""
    total = src["img"].new_zeros((), dtype=torch.float32)
    for m in ("img", "txt"):
        for layer in MEDIA_LAYERS:
            a = F.normalize(src[f"{m}_{layer}"].float(), dim=-1)
            b = F.normalize(tgt[f"{m}_{layer}"].float(), dim=-1)
            total = total + mmd2_unbiased(a, b, bandwidths)
    return total


def correlation_mmd(src: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                    bandwidths: list[float]) -> torch.Tensor:
    """``sum_{m in img, txt} MMD^2_u(u_m^s, u_m^t)`` on the shared layers' output (float32)."""
    return sum(mmd2_unbiased(src[m].float(), tgt[m].float(), bandwidths) for m in ("img", "txt"))
