"""`raycmr eval --plots`: the PNG files and the numbers behind them."""

import numpy as np
import pytest

from raycmr.evaluate.metrics import group_pairs, retrieval_metrics, retrieval_ranks
from raycmr.evaluate.plots import pca_2d, precision_recall_curve, recall_curve, write_plots


def _embeddings(n=200, classes=4, dim=16, seed=0):
    """Paired embeddings with a modality offset: text = image + noise + a shared shift."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim))
    img = centres[labels] + 0.8 * rng.normal(size=(n, dim))
    txt = img + 0.5 * rng.normal(size=(n, dim)) + 1.5
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return {"img": unit(img), "txt": unit(txt), "group": np.arange(n), "label": labels}


def test_recall_curve_equals_the_metrics_at_1_5_10():
    emb = _embeddings()
    rows, t2i_map = group_pairs(emb["group"])
    i2t, t2i = retrieval_ranks(emb["img"][rows], emb["txt"], t2i_map)
    metrics = retrieval_metrics(emb["img"][rows], emb["txt"], t2i_map)
    for ranks, d in ((i2t, "i2t"), (t2i, "t2i")):
        curve = recall_curve(ranks, 50)
        assert [curve[k - 1] for k in (1, 5, 10)] == [metrics[f"{d}_r{k}"] for k in (1, 5, 10)]
        assert np.all(np.diff(curve) >= 0) and curve[-1] <= 100.0


def test_precision_recall_curve_by_hand():
    # one query, gallery ranked by cosine: relevant at ranks 1 and 3 of 4
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    curve = precision_recall_curve(query, gallery, np.array([0]), np.array([0, 1, 0, 1]))
    # P@1 = 1 (R 0.5), P@3 = 2/3 (R 1.0): interpolated 1.0 up to recall 0.5, then 2/3
    expected = [1.0] * 6 + [2 / 3] * 5
    assert curve == pytest.approx(expected)


def test_pca_matches_scikit_learn():
    from sklearn.decomposition import PCA

    x = _embeddings()["img"].astype(np.float64)
    points, ratio = pca_2d(x)
    ref = PCA(n_components=2).fit(x)
    assert ratio == pytest.approx(ref.explained_variance_ratio_, rel=1e-9)
    # components agree up to sign
    ref_points = ref.transform(x)
    for j in range(2):
        sign = np.sign(points[:, j] @ ref_points[:, j])
        assert sign * points[:, j] == pytest.approx(ref_points[:, j], abs=1e-9)


def test_write_plots_draws_every_picture(tmp_path):
    from PIL import Image

    paths = write_plots(_embeddings(), tmp_path / "plots", sample=150)
    assert [p.name for p in paths] == ["recall_at_k.png", "rank_histogram.png",
                                       "precision_recall.png", "embedding_pca.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] >= 500
    unlabelled = {**_embeddings(), "label": np.full(200, -1)}
    names = [p.name for p in write_plots(unlabelled, tmp_path / "u")]
    assert "precision_recall.png" not in names and len(names) == 3
