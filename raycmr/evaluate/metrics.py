"""Retrieval metrics: Recall@K, median/mean rank (COCO/Flickr30K protocol) and mAP (label protocol).

Pure numpy (torch tensors are accepted and moved to CPU); no Ray, no FAISS. Similarities are
computed block by block, so a 100k x 100k evaluation never holds the full similarity matrix:
at most ``block_elems`` scores (default 2**24, i.e. 64 MiB of float32) live at once.

Ranking and ties
----------------
For a query with scores ``s`` over the candidates ``0..N-1``, candidates are ordered by
descending score; equal scores keep candidate-index order (a *stable* sort of ``-s``). The
1-based rank of candidate ``j`` is therefore

    rank(j) = 1 + #{k : s_k > s_j} + #{k < j : s_k == s_j}

which is exactly ``np.argsort(-s, kind="stable").tolist().index(j) + 1``. This is deterministic
and matches what a stable sort gives, but it favours lower indices: a collapsed model whose
embeddings are all equal still gets rank 1 for candidate 0. Real embeddings almost never tie.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BLOCK_ELEMS = 1 << 24  # scores held at once (64 MiB in float32)
RECALL_KS = (1, 5, 10)


# ------------------------------------------------------------------------------------ helpers


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A 2-D floating numpy array from a numpy array or torch tensor (float32 unless float64)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        t = x.detach().cpu()
        x = (t if str(t.dtype) == "torch.float64" else t.float()).numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); nothing to evaluate")
    if arr.dtype != np.float64:
        arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf values; check the model outputs")
    return np.ascontiguousarray(arr)


def _as_vector(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _check_dims(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding dimensions differ: {name_a} has dim {a.shape[1]}, {name_b} has dim "
            f"{b.shape[1]}; both must come from the same common space"
        )


def _block_rows(n_cols: int, block_elems: int) -> int:
    return max(1, int(block_elems) // max(1, n_cols))


def _stable_ranks(scores: np.ndarray, target_cols: np.ndarray) -> np.ndarray:
    """1-based rank of ``scores[r, target_cols[r]]`` in row r under the stable tie rule.

    rank_r = 1 + #{k : s_rk > t_r} + #{k < c_r : s_rk == t_r}, with c_r = target_cols[r] and
    t_r = s_{r c_r}; the target score is read from ``scores`` itself so the comparison is exact.
    """
    rows = np.arange(scores.shape[0])
    target = scores[rows, target_cols][:, None]
    ranks = 1 + np.count_nonzero(scores > target, axis=1)
    # Ties beyond the target itself are rare: resolve them only in the rows that have them.
    tied = np.flatnonzero(np.count_nonzero(scores == target, axis=1) > 1)
    if tied.size:
        sub = scores[tied] == target[tied]
        before = np.arange(scores.shape[1])[None, :] < target_cols[tied, None]
        ranks[tied] += np.count_nonzero(sub & before, axis=1)
    return ranks


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@K = 100 * mean(rank <= K); medr = floor(median(rank)); meanr = mean(rank).

    ``medr`` uses the VSE++ convention ``floor(median(rank0)) + 1`` with 0-based ``rank0``, which
    equals ``floor(median(rank))`` for 1-based ranks (it only matters for an even count).
    """
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


# ------------------------------------------------------------------------- recall / rank metrics


def retrieval_ranks(
    img_emb: Any,
    txt_emb: Any,
    txt_to_img: Any,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks for both directions: ``(i2t_ranks [N_img], t2i_ranks [N_txt])``.

    Similarity ``s(i, j) = <img_i, txt_j>`` (dot product; inputs are expected L2-normalised).

    * image -> text: image ``i`` ranks all ``N_txt`` captions; its rank is the best (smallest)
      rank among its own captions ``{j : txt_to_img[j] == i}``.
    * text -> image: caption ``j`` ranks all ``N_img`` images; its rank is the rank of image
      ``txt_to_img[j]``.

    Ties follow the stable rule of the module docstring. Every image must own >= 1 caption.
    """
    img = _as_matrix(img_emb, "img_emb")
    txt = _as_matrix(txt_emb, "txt_emb")
    _check_dims(img, txt, "img_emb", "txt_emb")
    dtype = np.result_type(img.dtype, txt.dtype)
    img, txt = img.astype(dtype, copy=False), txt.astype(dtype, copy=False)
    n_img, n_txt = img.shape[0], txt.shape[0]
    t2i = _as_vector(txt_to_img, "txt_to_img")
    if t2i.shape[0] != n_txt:
        raise ValueError(
            f"txt_to_img has {t2i.shape[0]} entries but txt_emb has {n_txt} rows; give one image "
            "index per caption"
        )
    if not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"txt_to_img must hold integer image indices, got dtype {t2i.dtype}")
    t2i = t2i.astype(np.int64)
    if t2i.min() < 0 or t2i.max() >= n_img:
        raise ValueError(
            f"txt_to_img values must lie in [0, {n_img}) (rows of img_emb), got range "
            f"[{t2i.min()}, {t2i.max()}]"
        )
    counts = np.bincount(t2i, minlength=n_img)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise ValueError(
            f"{missing.size} image(s) have no caption (first: row {missing[0]}); img_emb must "
            "hold only images that some caption points to (see group_pairs)"
        )

    # image -> text. Captions sorted by image so each image block owns a contiguous slice.
    by_img = np.argsort(t2i, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    i2t_ranks = np.empty(n_img, dtype=np.int64)
    step = _block_rows(n_txt, block_elems)
    for a in range(0, n_img, step):
        b = min(a + step, n_img)
        scores = img[a:b] @ txt.T  # [B, N_txt]
        own = by_img[starts[a]:starts[b]]  # captions of images a..b-1 (ascending index per image)
        rows = t2i[own] - a
        vals = scores[rows, own]
        best_val = np.full(b - a, -np.inf, dtype=scores.dtype)
        np.maximum.at(best_val, rows, vals)
        # The best own caption: highest score, lowest caption index among equal scores.
        best_col = np.full(b - a, n_txt, dtype=np.int64)
        hit = vals == best_val[rows]
        np.minimum.at(best_col, rows[hit], own[hit])
        i2t_ranks[a:b] = _stable_ranks(scores, best_col)

    # text -> image.
    t2i_ranks = np.empty(n_txt, dtype=np.int64)
    step = _block_rows(n_img, block_elems)
    for a in range(0, n_txt, step):
        b = min(a + step, n_txt)
        scores = txt[a:b] @ img.T  # [B, N_img]
        t2i_ranks[a:b] = _stable_ranks(scores, t2i[a:b])
    return i2t_ranks, t2i_ranks


def retrieval_metrics(
    img_emb: Any,
    txt_emb: Any,
    txt_to_img: Any,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> dict[str, float]:
    """Recall@{1,5,10}, median and mean rank in both directions, and rsum.

    Args:
        img_emb: [N_img, d] embeddings of the unique images.
        txt_emb: [N_txt, d] caption embeddings.
        txt_to_img: [N_txt] int, the row of ``img_emb`` each caption describes (COCO/Flickr30K
            have 5 captions per image).
        block_elems: how many similarity scores to hold in memory at once.

    Returns ``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, ..., t2i_meanr, rsum`` where
    (ranks 1-based, see :func:`retrieval_ranks`)

        R@K   = 100 * |{q : rank_q <= K}| / |Q|         (percent, as in VSE++)
        medr  = floor(median_q rank_q)                 (VSE++: floor(median(rank0)) + 1)
        meanr = mean_q rank_q
        rsum  = i2t_r1 + i2t_r5 + i2t_r10 + t2i_r1 + t2i_r5 + t2i_r10   (max 600)
    """
    i2t, t2i = retrieval_ranks(img_emb, txt_emb, txt_to_img, block_elems)
    out = _rank_summary(i2t, "i2t")
    out.update(_rank_summary(t2i, "t2i"))
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    return out


def group_pairs(groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """Turn per-pair rows into the (unique images, caption -> image) layout of retrieval_metrics.

    ``groups[p]`` is the image identity of pair ``p`` (any sortable dtype: ints or strings).
    Returns ``(img_rows, txt_to_img)``: ``img_rows`` [N_img] are the pair rows holding the first
    occurrence of each image (in order of first appearance) and ``txt_to_img`` [N_pairs] maps
    every pair (= caption) to its image's position in ``img_rows``, so that::

        retrieval_metrics(pair_img_emb[img_rows], pair_txt_emb, txt_to_img)

    evaluates pair-wise embeddings under the 5-captions-per-image protocol.
    """
    g = _as_vector(groups, "groups")
    if g.shape[0] == 0:
        raise ValueError("groups is empty; nothing to evaluate")
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique ids in order of first appearance
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    return first[order].astype(np.int64), position[inverse.reshape(-1)].astype(np.int64)


# ---------------------------------------------------------------------------------------- mAP


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(x.dtype).tiny)


def _labels(x: Any, n: int, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(
            f"{name} must be [n] class ids or [n, classes] multi-hot with n={n}, got shape "
            f"{arr.shape}"
        )
    return arr


def _relevance(q_lab: np.ndarray, g_lab: np.ndarray) -> np.ndarray:
    """[B, N_g] bool: same class (1-D labels) or at least one shared class (multi-hot)."""
    if q_lab.ndim == 1:
        return q_lab[:, None] == g_lab[None, :]
    return (q_lab.astype(np.float32) @ g_lab.astype(np.float32).T) > 0


def average_precision_per_query(
    query: Any,
    gallery: Any,
    query_labels: Any,
    gallery_labels: Any,
    k: int | None = None,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> np.ndarray:
    """Average precision of every query over the ranked gallery, shape [N_q] (float64).

    The gallery is ranked by cosine similarity ``cos(q, g) = <q, g> / (|q| |g|)``, descending,
    ties in gallery-index order (stable sort). With ``rel_i`` = 1 when the item at rank ``i``
    shares the query's label (1-D class ids: equal; 2-D multi-hot: any common class) and
    ``P@i = (1/i) sum_{j<=i} rel_j``::

        AP@k = (1 / R_k) * sum_{i=1..k} rel_i * P@i,   R_k = sum_{i=1..k} rel_i

    (``AP = 0`` when ``R_k = 0``). ``k=None`` ranks the whole gallery (mAP@all, where ``R_k`` is
    the number of relevant gallery items): the protocol of the Wikipedia benchmark and of the
    DSCMR/JFSSL evaluation code, which also divides by the relevant items retrieved in the top k.
    """
    q = _as_matrix(query, "query")
    g = _as_matrix(gallery, "gallery")
    _check_dims(q, g, "query", "gallery")
    ql = _labels(query_labels, q.shape[0], "query_labels")
    gl = _labels(gallery_labels, g.shape[0], "gallery_labels")
    if ql.ndim != gl.ndim:
        raise ValueError("query_labels and gallery_labels must both be 1-D ids or both multi-hot")
    n_g = g.shape[0]
    kk = n_g if k is None else int(k)
    if kk <= 0:
        raise ValueError(f"k must be a positive integer or None (whole gallery), got {k}")
    kk = min(kk, n_g)
    q, g = _normalise(q), _normalise(g)
    if q.dtype != g.dtype:
        q, g = q.astype(np.float64), g.astype(np.float64)
    precision_denominator = np.arange(1, kk + 1, dtype=np.float64)
    out = np.empty(q.shape[0], dtype=np.float64)
    step = _block_rows(n_g, block_elems)
    for a in range(0, q.shape[0], step):
        b = min(a + step, q.shape[0])
        scores = q[a:b] @ g.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        rel = np.take_along_axis(_relevance(ql[a:b], gl), order, axis=1).astype(np.float64)
        hits = rel.sum(axis=1)
        precision = np.cumsum(rel, axis=1) / precision_denominator
        out[a:b] = np.where(hits > 0, (precision * rel).sum(axis=1) / np.maximum(hits, 1), 0.0)
    return out


def mean_average_precision(
    query: Any,
    gallery: Any,
    query_labels: Any,
    gallery_labels: Any,
    k: int | None = None,
) -> float:
    """mAP@k = mean over queries of :func:`average_precision_per_query` (k=None: mAP@all)."""
    return float(np.mean(average_precision_per_query(query, gallery, query_labels,
                                                     gallery_labels, k=k)))


def map_both_ways(
    img: Any,
    txt: Any,
    labels: Any,
    txt_labels: Any | None = None,
    k: int | None = None,
) -> dict[str, float]:
    """Label-based mAP in both directions, as reported on Wikipedia / NUS-WIDE / PKU XMediaNet.

    ``i2t_map``: every image queries the text gallery; ``t2i_map``: every text queries the image
    gallery; ``avg_map = (i2t_map + t2i_map) / 2``. ``txt_labels`` defaults to ``labels``
    (paired data: row p of ``img`` and ``txt`` is one pair).
    """
    t_labels = labels if txt_labels is None else txt_labels
    i2t = mean_average_precision(img, txt, labels, t_labels, k=k)
    t2i = mean_average_precision(txt, img, t_labels, labels, k=k)
    return {"i2t_map": i2t, "t2i_map": t2i, "avg_map": (i2t + t2i) / 2.0}


def modality_gap(img: Any, txt: Any) -> float:
    """Distance between the centroids of the image and the text embeddings (Liang et al., "Mind
    the Gap", NeurIPS 2022)::

        gap = || mean_i u_i - mean_t v_t ||_2

    0 when the two modalities occupy the space alike; up to 2 for unit vectors of two opposite
    cones. A modality adversary (GRL) is meant to drive it toward 0.
    """
    u, v = _as_matrix(img, "img"), _as_matrix(txt, "txt")
    _check_dims(u, v, "img", "txt")
    return float(np.linalg.norm(u.astype(np.float64).mean(0) - v.astype(np.float64).mean(0)))


# ------------------------------------------------------------------------ minimal-pair groups


def group_accuracy(img: Any, txt: Any, image_of: Any, pair_group: Any,
                   kind: Any = None) -> dict[str, float]:
    """Minimal-pair group accuracy: a caption is right when its own image scores strictly above
    every other image of its minimal-pair group (images that differ from it in one binding).

    ``img`` [N, d] and ``txt`` [N, d] are per-pair rows; ``image_of[p]`` names pair ``p``'s
    image (captions of one image share it), ``pair_group[p]`` its minimal-pair group and
    ``kind[p]`` (optional) the group's kind of swap. Groups with one image are skipped. Returns
    ``group_acc`` (fraction of captions right), ``group_chance`` (the mean over those captions
    of 1 / images in their group: the accuracy of random scores), ``group_captions`` and, with
    ``kind``, ``group_acc_<kind>`` and ``group_chance_<kind>`` per kind."""
    img, txt = _as_matrix(img, "img"), _as_matrix(txt, "txt")
    image_of, pair_group = _as_vector(image_of, "image_of"), _as_vector(pair_group, "pair_group")
    kinds = None if kind is None else _as_vector(kind, "kind")
    right, chance, kind_of = [], [], []
    for g in np.unique(pair_group):
        rows = np.flatnonzero(pair_group == g)
        _, first = np.unique(image_of[rows], return_index=True)
        images = rows[np.sort(first)]  # one row per image of the group
        if images.size < 2:
            continue
        scores = txt[rows] @ img[images].T  # [captions, images]
        own = (image_of[rows][:, None] == image_of[images][None, :])
        own_score = scores[own]
        others = np.where(own, -np.inf, scores).max(1)
        right.extend((own_score > others).tolist())
        chance.extend([1.0 / images.size] * rows.size)
        kind_of.extend([str(kinds[r]) for r in rows] if kinds is not None else [""] * rows.size)
    return group_summary(right, chance, kind_of if kinds is not None else None)


def group_summary(right: Any, chance: Any, kind: Any = None) -> dict[str, float]:
    """The group-accuracy report of per-caption outcomes: ``right[q]`` (own image strictly
    above every other image of its group), ``chance[q]`` (1 / images in its group) and
    ``kind[q]`` (optional, the group's kind of swap) -> ``group_acc``, ``group_chance``,
    ``group_captions`` and, with ``kind``, ``group_acc_<kind>`` / ``group_chance_<kind>``
    (percent); empty when there are no captions."""
    right_a = np.asarray(right, dtype=bool).reshape(-1)
    chance_a = np.asarray(chance, dtype=np.float64).reshape(-1)
    if not right_a.size:
        return {}
    out = {"group_acc": float(100.0 * right_a.mean()),
           "group_chance": float(100.0 * chance_a.mean()),
           "group_captions": float(right_a.size)}
    if kind is not None:
        kind_a = np.asarray([str(k) for k in kind], dtype=object)
        for k in sorted(set(kind_a)):
            sel = kind_a == k
            out[f"group_acc_{k}"] = float(100.0 * right_a[sel].mean())
            out[f"group_chance_{k}"] = float(100.0 * chance_a[sel].mean())
    return out
