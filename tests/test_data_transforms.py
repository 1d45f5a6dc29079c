"""Batch transforms without Ray: decode/resize/augment/tokenize, bad rows flagged, groups."""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raycmr.data.pipeline import TokenizerError, load_tokenizer
from raycmr.data.synthetic import generate
from raycmr.data.text import load_text_encoder
from raycmr.data.transforms import (
    normalize_webdataset,
    preprocess_features,
    preprocess_images,
    stable_hash63,
    swap_left_right,
)

TOK = functools.partial(load_tokenizer, "minilm")
ENC = load_text_encoder("minilm")


def _img(colour=(255, 0, 0), size=(40, 30), fmt="PNG", split=None) -> bytes:
    img = Image.new("RGB", size, colour)
    if split is not None:  # left half colour, right half `split`
        img.paste(Image.new("RGB", (size[0] // 2, size[1]), split), (size[0] // 2, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _run(table, **kw):
    args = {"image_size": 16, "max_text_len": 12, "encode": ENC, "augment": False, "seed": 0}
    return preprocess_images(table, **{**args, **kw})


def test_outputs_shapes_dtypes_values_and_bad_rows():
    table = pa.table({
        "id": ["a", "b", "c", "d", "e", "f"],
        "image": [_img(), _img((0, 0, 255)), None, b"\x89PNG broken", _img(), _img()],
        "caption": ["red", "blue box", "x", "y", "   ", None],
        "image_id": ["img1", "img1", None, None, "img2", ""],
        "label": pa.array([3, None, 1, 1, 1, 2], type=pa.int64()),
        "domain": ["web", None, "", "", "", "x"],
    })
    out = _run(table)
    assert out["pixel_values"].shape == (6, 3, 16, 16) and out["pixel_values"].dtype == np.float32
    assert out["input_ids"].shape == (6, 12) and out["input_ids"].dtype == np.int64
    assert out["attention_mask"].dtype == np.int64
    assert out["valid"].tolist() == [True, True, False, False, False, False]
    assert out["drop_reason"].tolist() == ["", "", "null_image", "undecodable_image",
                                           "empty_caption", "empty_caption"]
    # solid red -> R channel 1.0, G/B -1.0 exactly; invalid rows are zero-filled
    np.testing.assert_allclose(out["pixel_values"][0, 0], 1.0)
    np.testing.assert_allclose(out["pixel_values"][0, 1:], -1.0)
    np.testing.assert_allclose(out["pixel_values"][1, 2], 1.0)
    assert not out["pixel_values"][2:].any() and not out["input_ids"][2:].any()
    # "[CLS] red [SEP]" then padding
    assert out["attention_mask"][0].tolist() == [1, 1, 1] + [0] * 9
    assert TOK().decode(out["input_ids"][1], skip_special_tokens=True) == "blue box"
    g = out["group"]
    assert g.dtype == np.int64 and (g >= 0).all()
    assert g[0] == g[1] == stable_hash63("img1")
    assert g[2] == stable_hash63("c") and g[5] == stable_hash63("f")  # no image_id: the id
    assert len(set(g.tolist())) == 5
    assert out["label"].tolist() == [3, -1, 1, 1, 1, 2]
    assert out["domain"].tolist() == ["web", "", "", "", "", "x"]


def test_missing_optional_columns_give_defaults_and_truncation():
    table = pa.table({"id": ["a"], "image": [_img(size=(64, 64))],
                      "caption": ["word " * 50]})
    out = _run(table)
    assert out["label"].tolist() == [-1] and out["domain"].tolist() == [""]
    assert out["attention_mask"][0].sum() == 12  # truncated to max_text_len


def test_augmentation_is_seeded_varies_by_epoch_and_flips_captions():
    n = 16
    table = pa.table({"id": [f"r{i}" for i in range(n)],
                      "image": [_img((255, 0, 0), (32, 32), split=(0, 0, 255))] * n,
                      "caption": ["red on the left and blue on the right"] * n})
    a = _run(table, augment=True, seed=1)
    b = _run(table, augment=True, seed=1)
    c = _run(table, augment=True, seed=1, epoch=1)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])
    plain = TOK()(["red on the left and blue on the right"], padding="max_length",
                  max_length=12, truncation=True)["input_ids"][0]
    swapped = TOK()(["red on the right and blue on the left"], padding="max_length",
                    max_length=12, truncation=True)["input_ids"][0]
    flipped = 0
    for i in range(n):
        left_red = a["pixel_values"][i, 0, :, 0].mean() > 0.9
        assert a["input_ids"][i].tolist() == (plain if left_red else swapped)
        flipped += not left_red
    assert 2 <= flipped <= 14
    assert swap_left_right("Left of the right") == "Right of the left"


def test_features_bad_rows_are_flagged():
    table = pa.table({
        "id": ["a", "b", "c", "d", "e"],
        "image_feat": pa.array([[1, 2, 3], None, [1, 2, 3], [1, float("nan"), 3], [4, 5, 6]],
                               type=pa.list_(pa.float32())),
        "text_feat": pa.array([[1, 0], [1, 0], [1, 0, 0], [1, 0], [0, 1]],
                              type=pa.list_(pa.float32())),
        "label": [0, 1, 2, 3, 4],
    })
    out = preprocess_features(table, image_dim=3, text_dim=2)
    assert out["valid"].tolist() == [True, False, False, False, True]
    assert out["drop_reason"].tolist() == ["", "null_feature", "bad_feature_dim",
                                           "nan_feature", ""]
    assert out["image_feat"].dtype == np.float32
    np.testing.assert_array_equal(out["image_feat"][[0, 4]], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(out["text_feat"][4], [0, 1])
    assert not out["image_feat"][1:4].any()
    assert out["label"].tolist() == [0, 1, 2, 3, 4]


def test_webdataset_columns_are_normalised():
    table = pa.table({
        "__key__": ["k0", "k1", "k2"], "__url__": ["u"] * 3,
        "jpg": [b"J0", None, None], "png": [None, b"P1", None],
        "txt": [b"cap zero", b"cap one", None],
        "json": [b'{"image_id": "im", "label": 4, "domain": "d"}', None, b"not json"],
    })
    out = normalize_webdataset(table)
    assert out.column("id").to_pylist() == ["k0", "k1", "k2"]
    assert out.column("image").to_pylist() == [b"J0", b"P1", None]
    assert out.column("caption").to_pylist() == ["cap zero", "cap one", None]
    assert out.column("image_id").to_pylist() == ["im", None, None]
    assert out.column("label").to_pylist() == [4, None, None]


def test_wrong_tokenizer_path_names_it(tmp_path):
    with pytest.raises(TokenizerError, match="'./no/such/tokenizer' is not a directory"):
        load_tokenizer("./no/such/tokenizer")
    with pytest.raises(TokenizerError, match=f"cannot load tokenizer '{tmp_path}'"):
        load_tokenizer(str(tmp_path))


def test_light_encoder_matches_the_hf_tokenizer():
    texts = [c for r in generate(50, seed=2, captions_per_image=2) for c in r.captions]
    texts += ["", "UPPER Case, punctuation!?", "word " * 40, "naïve café ünïcode"]
    for max_len in (8, 32):
        ids, mask = ENC(texts, max_len)
        ref = TOK()(texts, padding="max_length", truncation=True, max_length=max_len)
        assert ids.dtype == np.int64 and ids.shape == (len(texts), max_len)
        assert ids.tolist() == ref["input_ids"]
        assert mask.tolist() == ref["attention_mask"]
