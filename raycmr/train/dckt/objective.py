"""The DCKT objective: two domain branches, shared common layers, two-level transfer losses.

DCKT (Huang & Peng, "Deep Cross-media Knowledge Transfer", CVPR 2018) trains a large *source*
domain and a small *target* domain together. Each domain has its own two-pathway network (an
image tower and a text tower with their projections; both domains use the same architecture,
built from one ``model`` config), the two domains share the common (correlation) layers on top,
and each domain has a softmax classifier over its own label space.

With, for domain ``d`` in {s, t} and modality ``m`` in {img, txt}, the tower output ``f_m^d``,
the projection ``p_m^d = W_m^d f_m^d``, the shared layers' output ``c_m^d = shared(p_m^d)``, the
common representation ``u_m^d = n(c_m^d)`` (what retrieval uses), the domain's classifier
``C_d``, labels ``y^d`` and ``n(x) = x / ||x||``::

    L = sum_d [ w_c   * L_vse(u_img^d, u_txt^d)                         VSE++ on each domain
              + w_sem * (L_sem(C_d c_img^d, y^d) + L_sem(C_d c_txt^d, y^d)) / 2
              + w_pair * 1/n sum_i || n(p_img,i^d) - n(p_txt,i^d) ||_2 ]   pairwise constraint
      + w_mmd * [ sum_m sum_{l in {f, p}} MMD^2_u(n(l_m^s), n(l_m^t))      media-level transfer
                + sum_m MMD^2_u(u_m^s, u_m^t) ]                            correlation-level

``MMD^2_u`` is the unbiased multi-kernel Gaussian MMD (:func:`raycmr.losses.mmd.mmd2_unbiased`,
bandwidths ``dckt.kernel_bandwidths``), ``L_sem`` the softmax cross-entropy of
:func:`raycmr.losses.semantic.semantic_loss` (rows labelled -1 ignored) and ``L_vse`` the VSE++
loss of :mod:`raycmr.losses.contrastive` over the global batch of each domain (``loss.kind``,
``loss.weight = w_c``; ``loss.kind=none`` drops it). Layers are L2-normalised before the MMD so
that the kernel bandwidths mean the same thing at every layer (distances in [0, 2]), whatever
the scale of a tower's activations. The classifiers see the shared layers' output before the
L2 normalisation (DCKT's softmax layer sits on the common fully connected layer; on unit vectors
a linear softmax starts near uniform and learns slowly). The MMD and pairwise terms are per-worker means (their
gradients are averaged over workers like any data-parallel loss).

Round 0 of the progressive schedule trains with ``w_mmd = 0`` (the domains only meet through the
shared layers); the transfer rounds switch the MMD links on (:mod:`raycmr.train.dckt.rounds`;
the per-worker side is the task :class:`raycmr.train.dckt.task.DCKTTask`). The two transfer
terms' formulas are :mod:`raycmr.losses.dckt_transfer`.

The module keeps the *target* model as ``encoder``: a complete :class:`DualEncoder` (target
towers + projections, the shared layers, the target classifier), so that the trainer's export,
validation, ``raycmr eval`` and serving treat it like any other model. The source branch is a
second :class:`DualEncoder` without its own shared layers (it uses ``encoder.shared``);
:meth:`DCKTObjective.source_state_dict` exports it as a standalone :class:`DualEncoder`.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from raycmr.config import Config, ModelConfig
from raycmr.losses.dckt_transfer import correlation_mmd, media_mmd
from raycmr.losses.mmd import pairwise_constraint
from raycmr.losses.semantic import semantic_loss
from raycmr.models.dual_encoder import DualEncoder
from raycmr.train.contrastive import contrastive

DOMAINS = ("src", "tgt")


def source_model_config(model: ModelConfig, source_classes: int) -> ModelConfig:
    """The model config of the exported source model: the target's, with the source classes."""
    return dataclasses.replace(model, num_classes=source_classes)


def branch_layers(encoder: DualEncoder, shared: nn.Module,
                  batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every layer DCKT links, for one domain branch: ``img_tower``, ``img_proj``,
    ``img_common`` (shared layers' output) and ``img`` (its L2-normalisation, the retrieval
    embedding), and the same for ``txt``. ``img``/``txt`` equal ``DualEncoder.encode_image``/
    ``encode_text`` of a model whose shared layers are ``shared``."""
    x = batch["image_feat"] if encoder.features else batch["pixel_values"]
    img_tower = encoder.image_tower(x)
    if "text_feat" in batch:
        txt_tower = encoder.text_tower(batch["text_feat"])
    else:
        txt_tower = encoder.text_tower(batch["input_ids"], batch["attention_mask"])
    img_proj, txt_proj = encoder.image_proj(img_tower), encoder.text_proj(txt_tower)
    img_common, txt_common = shared(img_proj), shared(txt_proj)
    return {
        "img_tower": img_tower, "img_proj": img_proj, "img_common": img_common,
        "img": F.normalize(img_common, dim=-1),
        "txt_tower": txt_tower, "txt_proj": txt_proj, "txt_common": txt_common,
        "txt": F.normalize(txt_common, dim=-1),
    }


class DCKTObjective(nn.Module):
    """Source and target branches + shared layers + one classifier per domain; ``forward``
    returns the DCKT loss of one source batch and one target batch (module docstring)."""

    def __init__(self, cfg: Config, source_classes: int):
        super().__init__()
        if cfg.model.num_classes <= 0 or source_classes <= 0:
            raise ValueError(
                "DCKT needs a classifier per domain: model.num_classes (target classes) and "
                f"source_classes must be positive, got {cfg.model.num_classes} and "
                f"{source_classes}"
            )
        self.cfg = cfg
        self.source_classes = int(source_classes)
        # target model: towers, projections, the shared layers, the target classifier
        self.encoder = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
        # source branch: same architecture, own classifier, the shared layers of `encoder`
        src_cfg = dataclasses.replace(cfg.model, shared_layers=0, num_classes=source_classes)
        self.source = DualEncoder(src_cfg, temperature=cfg.loss.temperature)

    def source_state_dict(self) -> dict[str, torch.Tensor]:
        """The source branch as a standalone :class:`DualEncoder` state dict (with the shared
        layers), loadable into ``DualEncoder(source_model_config(cfg.model, source_classes))``."""
        state = {k: v for k, v in self.source.state_dict().items() if not k.startswith("shared.")}
        state.update({f"shared.{k}": v for k, v in self.encoder.shared.state_dict().items()})
        return state

    def domain_losses(self, layers: dict[str, torch.Tensor], labels: torch.Tensor,
                      groups: torch.Tensor, classifier: nn.Module) -> dict[str, torch.Tensor]:
        """One domain's own losses: ``contrastive``, ``semantic``, ``pair`` (unweighted)."""
        img, txt = layers["img"], layers["txt"]
        out = {}
        if self.cfg.loss.kind != "none":
            out["contrastive"] = contrastive(self.cfg.loss, img, txt, groups,
                                             self.encoder.logit_scale,
                                             self.cfg.train.batch_size).loss
        out["semantic"] = (semantic_loss(classifier(layers["img_common"]), labels)
                           + semantic_loss(classifier(layers["txt_common"]), labels)) / 2.0
        out["pair"] = pairwise_constraint(F.normalize(layers["img_proj"], dim=-1),
                                          F.normalize(layers["txt_proj"], dim=-1))
        return out

    def forward(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                mmd_weight: float | None = None) -> dict[str, torch.Tensor]:
        """``loss`` (with grad) and detached parts: ``{src,tgt}_{contrastive,semantic,pair}``,
        ``mmd_media``, ``mmd_corr`` (computed and logged even when ``mmd_weight`` is 0).
        ``mmd_weight=None`` uses ``dckt.mmd_weight``."""
        d = self.cfg.dckt
        w_mmd = d.mmd_weight if mmd_weight is None else float(mmd_weight)
        shared = self.encoder.shared
        layers = {"src": branch_layers(self.source, shared, source),
                  "tgt": branch_layers(self.encoder, shared, target)}
        batches = {"src": source, "tgt": target}
        classifiers = {"src": self.source.classifier, "tgt": self.encoder.classifier}
        weights = {"contrastive": self.cfg.loss.weight, "semantic": d.semantic_weight,
                   "pair": d.pair_weight}
        total = layers["tgt"]["img"].new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for dom in DOMAINS:
            own = self.domain_losses(layers[dom], batches[dom]["label"], batches[dom]["group"],
                                     classifiers[dom])
            for name, value in own.items():
                total = total + weights[name] * value.float()
                parts[f"{dom}_{name}"] = value.detach()
        bw = list(d.kernel_bandwidths)
        mmd_media = media_mmd(layers["src"], layers["tgt"], bw)
        mmd_corr = correlation_mmd(layers["src"], layers["tgt"], bw)
        if w_mmd != 0.0:
            total = total + w_mmd * (mmd_media + mmd_corr)
        parts.update(mmd_media=mmd_media.detach(), mmd_corr=mmd_corr.detach(),
                     mmd_weight=torch.tensor(w_mmd))
        parts["loss"] = total
        return parts
