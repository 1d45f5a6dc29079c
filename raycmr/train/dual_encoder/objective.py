"""The training objective: dual encoder + the enabled losses, as one module DeepSpeed can wrap.

    L = w_c * L_contrastive(global batch) + w_grl * (L_D + lambda * L_confusion)   [ACMR]
      + (w_common * J_common + alpha * J_label + beta * J_invariance)     [DSCMR]
      + w_d * L_distill(local batch, frozen teacher)                       [Miech et al. 2021]

Distillation's teacher is either the feature teacher of ``loss.distill.feature_teacher``
(feature shards; every (text, image) pair of the batch) or the captioning slow model of
``loss.distill.slow`` (image shards; each caption against its image and the
``loss.distill.hard_negatives`` hardest in-batch images by the fast scores, section 2.2).

The contrastive part sees every worker's embeddings (one packed gather,
:func:`raycmr.losses.batch.global_batch`, anchors by ``loss.anchors``) unless
``loss.global_negatives`` is off; the other parts are per-worker means (their gradients are
averaged over workers by the optimizer, like any data-parallel loss).

Plain PyTorch (DeepSpeed wraps it in :mod:`raycmr.train.loop`); the task that trains it is
:class:`raycmr.train.dual_encoder.task.DualEncoderTask`.
"""

from __future__ import annotations

import torch
from torch import nn

from raycmr import distributed
from raycmr.config import Config
from raycmr.losses.contrastive import clamped_logit_scale
from raycmr.models.dual_encoder import DualEncoder
from raycmr.train.contrastive import contrastive


def load_teacher(cfg: Config) -> nn.Module:
    """The frozen teacher of ``loss.distill``: the feature teacher (``feature_teacher``, checked
    against the feature sizes) or the slow model (``slow``, checked against the image and text
    inputs).

    Built under a forked RNG: constructing it (random init before its weights load) must not
    move the random streams of the run (dropout, ...), so that a distilled run is the
    undistilled one until the distillation term starts (``loss.distill.start``)."""
    with torch.random.fork_rng(devices=[]):
        teacher = load_slow_teacher(cfg) if cfg.loss.distill.slow else load_feature_teacher(cfg)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def load_feature_teacher(cfg: Config) -> nn.Module:
    """The feature teacher of ``loss.distill.feature_teacher``; it must read the same features."""
    from raycmr import artifacts
    from raycmr.config import ConfigError

    teacher = artifacts.load_feature_teacher(cfg.loss.distill.feature_teacher)
    rc, path = teacher.cfg, cfg.loss.distill.feature_teacher
    if rc.query != "features" or rc.text_dim != cfg.model.text.input_dim \
            or rc.image_dim != cfg.model.image.input_dim:
        raise ConfigError(
            f"loss.distill.feature_teacher '{path}' scores {rc.query} queries of "
            f"{rc.text_dim}-d against {rc.image_dim}-d images; this model reads text_feat of "
            f"{cfg.model.text.input_dim}-d and image_feat of {cfg.model.image.input_dim}-d: "
            "train the teacher on the same features")
    if rc.fast_weight > 0:
        raise ConfigError(
            f"loss.distill.feature_teacher '{path}' is a residual "
            f"model (fast_weight {rc.fast_weight}): its score leans on a fast model, not a "
            "teacher of one; train the teacher with `raycmr teacher ... --fast-weight 0`")
    return teacher


def load_slow_teacher(cfg: Config) -> nn.Module:
    """The slow model of ``loss.distill.slow``; it must read the same pixels and captions."""
    from raycmr.artifacts import load_slow_exported
    from raycmr.config import ConfigError

    path = cfg.loss.distill.slow
    teacher, tcfg = load_slow_exported(path)
    problems = []
    if tcfg.data.image_size != cfg.data.image_size:
        problems.append(f"images of {tcfg.data.image_size} px, this run "
                        f"data.image_size={cfg.data.image_size}")
    if tcfg.data.tokenizer != cfg.data.tokenizer:
        problems.append(f"captions tokenised by '{tcfg.data.tokenizer}', this run "
                        f"data.tokenizer='{cfg.data.tokenizer}' (another vocabulary)")
    if tcfg.data.max_text_len < cfg.data.max_text_len:
        problems.append(f"captions of at most {tcfg.data.max_text_len} tokens, this run "
                        f"data.max_text_len={cfg.data.max_text_len}")
    vocab_size = (cfg.model.text.hf_config or {}).get("vocab_size")
    if vocab_size and int(teacher.vocab.max()) >= int(vocab_size):
        problems.append(f"token ids up to {int(teacher.vocab.max())}, beyond this text tower's "
                        f"vocab_size {vocab_size}")
    if problems:
        raise ConfigError(f"loss.distill.slow '{path}' cannot teach this model: the slow model "
                          f"reads {'; '.join(problems)}. Train the slow model on the same data "
                          "config (raycmr train --config quickstart_slow)")
    return teacher


class CrossModalObjective(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.encoder = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
        self.discriminator: nn.Module | None = None
        if cfg.loss.grl.enabled:
            from raycmr.models.adversary import ModalityDiscriminator

            self.discriminator = ModalityDiscriminator(cfg.model.embed_dim, cfg.loss.grl.hidden_dim)
        # Kept out of the module tree on purpose: DeepSpeed must not cast (bf16), shard,
        # optimise or checkpoint the frozen teacher; the config names its directory.
        self._teacher: tuple[nn.Module, ...] = (load_teacher(cfg),) if cfg.loss.distill.enabled \
            else ()
        # loss.distill.candidates=random draws from its own generator (seed and rank), so the
        # run's random streams stay those of the undistilled run
        self._candidate_rng = torch.Generator().manual_seed(cfg.train.seed * 1009 + distributed.rank())

    def distillation(self, img: torch.Tensor, txt: torch.Tensor,
                     batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KL of the fast model's in-batch text->image distribution from the teacher's."""
        from raycmr.losses.distill import distillation_loss

        (teacher,) = self._teacher
        if next(teacher.parameters()).device != img.device:
            teacher.to(img.device)
        scale = clamped_logit_scale(self.encoder.logit_scale).exp()
        if self.cfg.loss.distill.slow:
            # the current scale without gradient: a near one-hot teacher over the hardest
            # candidates would drive it to the clamp within a few steps, where InfoNCE from random
            # init turns into a hardest-negative loss and stops learning (README, distillation)
            return self.slow_distillation(teacher, scale.detach() * (txt @ img.t()), batch)
        fast = scale * (txt @ img.t())
        b = img.shape[0]
        with torch.no_grad():
            slow = teacher.score_candidates(
                {"text_feat": batch["text_feat"]},
                batch["image_feat"].unsqueeze(0).expand(b, -1, -1))
        return distillation_loss(fast, slow, self.cfg.loss.distill.temperature)

    def slow_distillation(self, teacher: nn.Module, fast: torch.Tensor,
                          batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Section 2.2 of Miech et al.: the slow model's phi(x) of the batch's pixels (once per
        image), then h of each caption against its image and its m hardest in-batch images
        by the fast logits ``fast`` [B, B] (B * (m + 1) pairs), and the KL over those."""
        from raycmr.losses.distill import hardest_candidates, restricted_distillation_loss

        d = self.cfg.loss.distill
        b = fast.shape[0]
        group = batch["group"]
        same = group[:, None] == group[None, :]
        positive = torch.arange(b, device=fast.device)
        # "random": the same choice made on random scores, uniform over the admissible columns
        pick_by = fast if d.candidates == "hardest" else \
            torch.rand(fast.shape, generator=self._candidate_rng, device="cpu").to(fast.device)
        candidates, valid = hardest_candidates(pick_by, positive, min(d.hard_negatives, b - 1),
                                               same & ~torch.eye(b, dtype=torch.bool,
                                                                 device=fast.device))
        dtype = next(teacher.parameters()).dtype
        with torch.no_grad():
            phi = teacher.encode_image(batch["pixel_values"].to(dtype))  # [B, P, w], once each
            # cross-attention keys/values once per image, then only the B * (m + 1) pairs
            slow = teacher.score_gallery(teacher.gallery(phi), candidates, batch["input_ids"],
                                         batch["attention_mask"])  # [B, m + 1]
        return restricted_distillation_loss(fast, slow, candidates, d.temperature, valid)

    def adversary(self, img: torch.Tensor, txt: torch.Tensor, lambd: float
                  ) -> dict[str, torch.Tensor]:
        """The modality adversary's term (``adversary_total``, with grad; ``lambd`` scales the
        encoders' part) and its detached parts: ``adversary`` (the discriminator's
        cross-entropy), ``disc_acc`` and, for the confusion update, ``confusion``."""
        from raycmr.losses.adversary import modality_adversary_loss, modality_confusion_losses

        g = self.cfg.loss.grl
        if g.update == "reversal":
            adv, acc = modality_adversary_loss(self.discriminator, img, txt, lambd)
            return {"adversary_total": adv, "adversary": adv.detach(), "disc_acc": acc}
        disc_loss, confusion, acc = modality_confusion_losses(
            self.discriminator, img, txt, g.label_smoothing)
        return {"adversary_total": disc_loss + lambd * confusion, "adversary": disc_loss.detach(),
                "confusion": confusion.detach(), "disc_acc": acc}

    def hard_negative_texts(self, batch: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The perturbed captions of the batch (``neg_input_ids`` [B, k, L], from
        data.hard_negatives) embedded: ``([B, k, d], valid [B, k])``; only the valid ones go
        through the text tower (the others are zeros, left out of the loss)."""
        if "neg_input_ids" not in batch:
            return None
        ids, valid = batch["neg_input_ids"], batch["neg_valid"].bool()
        b, k, length = ids.shape
        flat = valid.reshape(-1)
        if not flat.any():
            return self.encoder.logit_scale.new_zeros((b, k, self.cfg.model.embed_dim)), valid
        emb = self.encoder.encode_text({
            "input_ids": ids.reshape(b * k, length)[flat],
            "attention_mask": batch["neg_attention_mask"].reshape(b * k, length)[flat]})
        out = emb.new_zeros((b * k, emb.shape[1])).index_copy(0, flat.nonzero()[:, 0], emb)
        return out.reshape(b, k, -1), valid

    def forward(self, batch: dict[str, torch.Tensor], grl_lambda: float = 0.0,
                progress: float = 1.0):
        """Returns a dict: ``loss`` (the total, with grad) and detached parts for logging.
        ``progress`` (optimizer steps done / total) drives the MH warm-up's hand-over."""
        img, txt = self.encoder(batch)
        return self.losses(img, txt, batch, grl_lambda, progress)

    def losses(self, img: torch.Tensor, txt: torch.Tensor, batch: dict[str, torch.Tensor],
               grl_lambda: float = 0.0, progress: float = 1.0):
        """:meth:`forward` from the batch's embeddings ``img``, ``txt`` (GradCache computes
        them chunk by chunk without graph, :mod:`raycmr.train.grad_cache`)."""
        loss_cfg = self.cfg.loss
        parts: dict[str, torch.Tensor] = {}
        total = img.new_zeros(())
        if loss_cfg.kind != "none":
            hard = self.hard_negative_texts(batch)
            out = contrastive(loss_cfg, img, txt, batch["group"], self.encoder.logit_scale,
                              self.cfg.train.batch_size * max(1, self.cfg.data.group_size),
                              progress, hard)
            total = total + loss_cfg.weight * out.loss
            parts.update(contrastive=out.loss.detach(), hardest_neg_sim=out.hardest_neg_sim,
                         pos_sim=out.pos_sim)
            if hard is not None:  # captions the perturber could not change: in-batch only
                parts.update(hard_neg_unchanged=(~hard[1].any(1)).float().mean(),
                             hard_neg_per_caption=hard[1].float().sum(1).mean())
        if self.discriminator is not None:
            parts.update(self.adversary(img, txt, grl_lambda))
            total = total + loss_cfg.grl.weight * parts.pop("adversary_total")
        if loss_cfg.dscmr.enabled:
            from raycmr.losses.dscmr import dscmr_loss

            d = loss_cfg.dscmr
            clf = self.encoder.classifier
            res = dscmr_loss(img, txt, clf(img), clf(txt), batch["label"], alpha=d.alpha,
                             beta=d.beta, common_weight=d.weight)
            total = total + res["total"]
            parts.update({f"dscmr_{k}": v.detach() for k, v in res.items()})
        if self._teacher:
            # before loss.distill.start (a fraction of the run) the teacher is not called
            if progress >= loss_cfg.distill.start:
                distill = self.distillation(img, txt, batch)
                total = total + loss_cfg.distill.weight * distill
            else:
                distill = img.new_zeros((), dtype=torch.float32)
            parts["distill"] = distill.detach()
        parts["loss"] = total
        return parts
