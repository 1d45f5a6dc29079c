"""DSCMR supervision: Deep Supervised Cross-Modal Retrieval (Zhen, Hu, Wang & Peng, CVPR 2019).

Inputs are a batch of ``n`` paired common-space embeddings ``U`` (images) and ``V`` (texts), the
outputs ``P_img = U W``, ``P_txt = V W`` of the shared linear classifier ``W`` that lives on the
model, and class labels. ``Y`` is the one-hot (or multi-hot) label matrix. Three losses:

1. Label space (discrimination in the label space)::

       J_label = mean_i ||p_i^img - y_i||_2  +  mean_i ||p_i^txt - y_i||_2

   The paper writes ``1/n ||P - Y||_F``; like the official code (penghu-cs/DSCMR,
   ``train_model.calc_loss``) we take the MEAN OVER SAMPLES OF THE PER-SAMPLE L2 NORM
   (``((P - Y)**2).sum(1).sqrt().mean()``), not the matrix Frobenius norm divided by ``n``.

2. Common space (discrimination in the common representation space): with
   ``Theta_ij = cos(a_i, b_j) / 2`` and ``S_ij = 1`` if samples ``i`` and ``j`` share a label,
   the negative log-likelihood of ``S`` under ``P(S_ij = 1) = sigmoid(Theta_ij)``::

       J(A, B) = -(1/n^2) sum_{i,j} ( S_ij Theta_ij - log(1 + exp(Theta_ij)) )
       J_common = J(U, U) + J(U, V) + J(V, V)

   ``log(1 + exp(.))`` is computed as ``softplus``. Every ``(i, j)`` pair counts, the diagonal of
   the image-image and text-text terms included (as in the official code's ``.mean()``).

3. Modality invariance::

       J_invariance = mean_i ||u_i - v_i||_2      (paper: 1/n ||U - V||_F; same convention as 1.)

Total (the weighting of raycmr's ``DSCMRConfig``)::

    total = common_weight * J_common + alpha * J_label + beta * J_invariance

DEPARTURES from the official code, stated plainly:

- Weighting. The official code computes ``J_label + alpha * J_common + beta * J_invariance``
  (defaults ``alpha = 1e-3``, ``beta = 1e-1``). raycmr puts ``alpha`` on the label term and a
  separate ``common_weight`` on the common term. The official run is reproduced with
  ``common_weight=1e-3, alpha=1.0, beta=0.1``.
- Multi-hot labels. The official code uses ``S = Y1 Y2^T``, which counts shared labels (values
  above 1 for multi-label data). Here ``S`` is binary: 1 when at least one label is shared, as in
  the paper's definition. For single-label data the two agree.
- Cosine. The official code divides by ``clamp(|a||b|, min=1e-6)``; here each norm is clamped at
  ``eps`` before dividing. They agree for any non-degenerate embedding.
- Zero rows. Norms use ``torch.linalg.vector_norm``, whose gradient at a zero vector is 0; the
  official ``.sqrt()`` gives NaN there (e.g. ``u_i == v_i`` exactly in the invariance term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _label_matrix(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Class indices ``[n]`` -> one-hot ``[n, C]``; multi-hot ``[n, C]`` passes through."""
    if labels.dim() == 1:
        if labels.dtype.is_floating_point:
            raise ValueError("DSCMR labels of shape [n] must be integer class indices")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"DSCMR labels must lie in [0, {num_classes}) (the classifier's output size); got "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )
        return F.one_hot(labels.long(), num_classes).to(dtype)
    if labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(
                f"DSCMR multi-hot labels have {labels.shape[1]} columns but the classifier "
                f"outputs {num_classes} classes"
            )
        return labels.to(dtype)
    raise ValueError(f"DSCMR labels must be [n] indices or [n, C] multi-hot, got {labels.shape}")


def _half_cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``Theta = cos(a_i, b_j) / 2`` as an ``[n_a, n_b]`` matrix."""
    return F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).t() / 2.0


def _pair_nll(theta: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``-(1/n^2) sum_ij (S_ij Theta_ij - log(1 + exp(Theta_ij)))``."""
    return (F.softplus(theta) - sim * theta).mean()


def dscmr_loss(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    img_logits: torch.Tensor,
    txt_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.1,
    beta: float = 0.1,
    *,
    txt_labels: torch.Tensor | None = None,
    common_weight: float = 1.0,
    eps: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """DSCMR loss and its parts (see the module docstring for the formulas).

    Args:
        img_emb, txt_emb: ``U``, ``V`` ``[n, d]`` common-space embeddings of the ``n`` pairs.
        img_logits, txt_logits: ``P_img``, ``P_txt`` ``[n, C]`` shared-classifier outputs (no
            softmax; the label-space loss regresses them onto ``Y``).
        labels: ``[n]`` class indices or ``[n, C]`` multi-hot of the images (and of the texts,
            unless ``txt_labels`` is given).
        alpha: weight of ``J_label``. beta: weight of ``J_invariance``.
        common_weight: weight of ``J_common``.

    Returns a dict of scalar tensors: ``total`` (the weighted loss), ``common`` (``J_common``),
    ``common_ii``, ``common_it``, ``common_tt``, ``label`` (``J_label``), ``label_img``,
    ``label_txt`` and ``invariance``.
    """
    if img_emb.shape != txt_emb.shape:
        raise ValueError(
            f"DSCMR needs paired embeddings of equal shape, got {tuple(img_emb.shape)} and "
            f"{tuple(txt_emb.shape)}"
        )
    num_classes = img_logits.shape[1]
    y_img = _label_matrix(labels, num_classes, img_logits.dtype)
    y_txt = y_img if txt_labels is None else _label_matrix(txt_labels, num_classes, img_logits.dtype)

    label_img = torch.linalg.vector_norm(img_logits - y_img, dim=1).mean()
    label_txt = torch.linalg.vector_norm(txt_logits - y_txt, dim=1).mean()

    s_ii = (y_img @ y_img.t() > 0).to(img_emb.dtype)
    s_it = (y_img @ y_txt.t() > 0).to(img_emb.dtype)
    s_tt = (y_txt @ y_txt.t() > 0).to(img_emb.dtype)
    common_ii = _pair_nll(_half_cosine(img_emb, img_emb, eps), s_ii)
    common_it = _pair_nll(_half_cosine(img_emb, txt_emb, eps), s_it)
    common_tt = _pair_nll(_half_cosine(txt_emb, txt_emb, eps), s_tt)

    invariance = torch.linalg.vector_norm(img_emb - txt_emb, dim=1).mean()

    common = common_ii + common_it + common_tt
    label = label_img + label_txt
    total = common_weight * common + alpha * label + beta * invariance
    return {
        "total": total,
        "common": common,
        "common_ii": common_ii,
        "common_it": common_it,
        "common_tt": common_tt,
        "label": label,
        "label_img": label_img,
        "label_txt": label_txt,
        "invariance": invariance,
    }
