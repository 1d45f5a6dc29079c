"""Pictures of a split's retrieval: what ``raycmr eval --plots DIR`` draws (matplotlib, Agg).

* ``recall_at_k.png``: R@K for K = 1..``max_k`` both ways (R@K = 100 * share of queries whose
  match ranks <= K; at K = 1, 5, 10 the numbers of the metrics table);
* ``rank_histogram.png``: the distribution of the match's rank both ways (log-spaced bins);
* ``precision_recall.png`` (labelled data): precision against recall over the whole ranked
  gallery, averaged over queries at 11 recall levels (interpolated precision, as in the
  PASCAL VOC / TREC 11-point curve), one curve per direction, the mAP in the legend;
* ``embedding_pca.png``: a sample of image and text embeddings projected on the first two
  principal components of the sample (both modalities together), coloured by modality, and a
  second panel coloured by class when labels exist: the modality gap is the distance between
  the two clouds, which a GRL adversary should close.

The numbers behind each picture come from functions here (``recall_curve``,
``precision_recall_curve``, ``pca_2d``) so they can be checked against the metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raycmr.evaluate.metrics import group_pairs, retrieval_ranks

RECALL_LEVELS = np.linspace(0.0, 1.0, 11)


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """R@K for K = 1..max_k, in percent: ``100 * mean(ranks <= K)``."""
    ks = np.arange(1, max_k + 1)
    return 100.0 * (np.asarray(ranks)[:, None] <= ks[None, :]).mean(axis=0)


def precision_recall_curve(query: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray,
                           g_labels: np.ndarray) -> np.ndarray:
    """Mean interpolated precision at the recall levels 0, 0.1, ..., 1 over all queries.

    For a query, the gallery is ranked by cosine similarity (ties in index order) and
    ``p_interp(r) = max{P@i : R@i >= r}``; queries without a relevant item are skipped."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    rel = (q_labels[:, None] == g_labels[None, :])
    rel = np.take_along_axis(rel, order, axis=1).astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    total = hits[:, -1]
    keep = total > 0
    precision = hits[keep] / np.arange(1, g.shape[0] + 1)
    recall = hits[keep] / total[keep, None]
    out = np.zeros((keep.sum(), len(RECALL_LEVELS)))
    for j, level in enumerate(RECALL_LEVELS):
        out[:, j] = np.where(recall >= level - 1e-12, precision, 0.0).max(axis=1)
    return out.mean(axis=0)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points projected on the first two principal components, explained variance ratio of
    each), by SVD of the centred data."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    variance = s ** 2
    return centred @ vt[:2].T, variance[:2] / variance.sum()


def write_plots(emb: dict[str, np.ndarray], out_dir: str | Path, *, max_k: int = 50,
                sample: int = 1000, seed: int = 0) -> list[Path]:
    """Draw the plots of one split's embeddings (``img``, ``txt``, ``group``, ``label`` as
    :func:`raycmr.data.embed.embed_split` returns them) into ``out_dir``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img_rows, txt_to_img = group_pairs(emb["group"])
    i2t, t2i = retrieval_ranks(emb["img"][img_rows], emb["txt"], txt_to_img)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    k = min(max_k, len(img_rows), len(txt_to_img))
    for ranks, label in ((i2t, "image->text"), (t2i, "text->image")):
        ax.plot(np.arange(1, k + 1), recall_curve(ranks, k), label=label)
    ax.set(xlabel="K", ylabel="R@K (%)", title="Recall at K", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "recall_at_k.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(int(i2t.max()), int(t2i.max()), 2)
    bins = np.unique(np.geomspace(1, top + 1, 30).astype(int))
    ax.hist([i2t, t2i], bins=bins, label=["image->text", "text->image"])
    ax.set(xscale="log", xlabel="rank of the match", ylabel="queries", title="Rank histogram")
    ax.legend()
    written.append(_save(fig, out / "rank_histogram.png"))

    labels = emb["label"]
    labelled = labels.size > 0 and bool((labels >= 0).all())
    if labelled:
        from raycmr.evaluate.metrics import map_both_ways

        maps = map_both_ways(emb["img"], emb["txt"], labels)
        fig, ax = plt.subplots(figsize=(6, 4))
        for q, g, key, label in ((emb["img"], emb["txt"], "i2t_map", "image->text"),
                                 (emb["txt"], emb["img"], "t2i_map", "text->image")):
            ax.plot(RECALL_LEVELS, precision_recall_curve(q, g, labels, labels), marker="o",
                    label=f"{label} (mAP {maps[key]:.3f})")
        ax.set(xlabel="recall", ylabel="interpolated precision", title="Precision-recall",
               xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, out / "precision_recall.png"))

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(emb["img"]), size=min(sample, len(emb["img"])), replace=False))
    points, ratio = pca_2d(np.concatenate([emb["img"][pick], emb["txt"][pick]]))
    n = len(pick)
    panels = 2 if labelled else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    ax = axes[0, 0]
    ax.scatter(points[:n, 0], points[:n, 1], s=6, alpha=0.6, label="images")
    ax.scatter(points[n:, 0], points[n:, 1], s=6, alpha=0.6, label="texts")
    ax.set(xlabel=f"PC1 ({100 * ratio[0]:.1f}%)", ylabel=f"PC2 ({100 * ratio[1]:.1f}%)",
           title=f"PCA of {n} pairs by modality")
    ax.legend(markerscale=3)
    if labelled:
        ax = axes[0, 1]
        both = np.concatenate([labels[pick], labels[pick]])
        ax.scatter(points[:n, 0], points[:n, 1], c=both[:n], cmap="tab10", s=8, marker="o",
                   label="images")
        ax.scatter(points[n:, 0], points[n:, 1], c=both[n:], cmap="tab10", s=8, marker="x",
                   label="texts")
        ax.set(xlabel="PC1", ylabel="PC2", title="by class (o images, x texts)")
    written.append(_save(fig, out / "embedding_pca.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
