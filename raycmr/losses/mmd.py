"""Multi-kernel MMD between two sets of embeddings, and the paired-distance constraint.

Maximum mean discrepancy (Gretton, Borgwardt, Rasch, Schoelkopf & Smola, JMLR 2012, "A Kernel
Two-Sample Test", Lemma 6) with a multi-kernel Gaussian kernel as in DAN (Long et al., ICML
2015). DCKT (Huang & Peng, CVPR 2018, "Deep Cross-media Knowledge Transfer") uses MK-MMD to
align the source and target domains' representations in each modality, together with a
pairwise constraint that pulls the two modalities of each pair together.

Kernel (a SUM of Gaussians, one per bandwidth ``sigma_k``)::

    k(a, b) = sum_k exp(-||a - b||^2 / (2 sigma_k^2))

Unbiased estimator of MMD^2 for ``x`` (``m`` rows) and ``y`` (``n`` rows)::

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j)
            + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
            - 2/(mn)     sum_{i, j}   k(x_i, y_j)

Its expectation is the population MMD^2 (0 when ``x`` and ``y`` come from one distribution), so a
single estimate can be negative. With the sum over ``K`` kernels ``k(a, a) = K``; dividing by
``K`` gives the equal-weight convex combination of DAN, a constant factor that the loss weight
absorbs.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` as ``[m, n]``, via ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2.0 * (a @ b.t())
    return d.clamp(min=0.0)


def _kernel(sq: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(sq)
    for sigma in bandwidths:
        out = out + torch.exp(-sq / (2.0 * float(sigma) ** 2))
    return out


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Unbiased multi-kernel Gaussian MMD^2 between ``x`` ``[m, d]`` and ``y`` ``[n, d]``.

    Kernel ``k(a, b) = sum_k exp(-||a - b||^2 / (2 sigma_k^2))`` over ``bandwidths`` (the
    ``sigma_k``, in the units of the embeddings; for L2-normalised embeddings distances lie in
    ``[0, 2]``). Within-set sums leave out the diagonal ``i = j``. Needs ``m, n >= 2``. May be
    negative.
    """
    if not bandwidths:
        raise ValueError("mmd2_unbiased needs at least one kernel bandwidth")
    if any(float(s) <= 0 for s in bandwidths):
        raise ValueError(f"kernel bandwidths must be positive, got {list(bandwidths)}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"mmd2_unbiased needs [m, d] and [n, d] inputs, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"mmd2_unbiased needs at least 2 rows in each set, got {m} and {n}")
    k_xx = _kernel(_sq_dists(x, x), bandwidths)
    k_yy = _kernel(_sq_dists(y, y), bandwidths)
    k_xy = _kernel(_sq_dists(x, y), bandwidths)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    xy = k_xy.sum() / (m * n)
    return xx + yy - 2.0 * xy


def pairwise_constraint(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between the two modalities of each pair::

        L_pair = 1/n sum_i ||img_i - txt_i||_2

    (gradient 0, not NaN, for a pair whose embeddings coincide).
    """
    if img.shape != txt.shape:
        raise ValueError(
            f"pairwise_constraint needs paired inputs of equal shape, got {tuple(img.shape)} and "
            f"{tuple(txt.shape)}"
        )
    return torch.linalg.vector_norm(img - txt, dim=1).mean()
