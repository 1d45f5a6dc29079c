"""Batch transforms run inside Ray Data ``map_batches`` tasks: decode, resize, augment, tokenize.

No Ray in here: each function maps one Arrow batch to a dict of NumPy arrays, so it is tested on
plain tables. Bad records are kept with ``valid=False`` and a ``drop_reason`` (zero-filled
tensors), so that training workers can count them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycmr.data.scan import image_name
from raycmr.data.schema import WDS_IMAGE_EXTENSIONS
from raycmr.data.text import TextEncoder

AUGMENT_SCALE = 1.125  # training images are resized to this x image_size, then randomly cropped
_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left",
         "LEFT": "RIGHT", "RIGHT": "LEFT"}


def stable_hash63(text: str) -> int:
    """A process-independent 63-bit hash (blake2b), non-negative, for ``group`` ids."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def swap_left_right(text: str) -> str:
    """``"a cat on the left"`` -> ``"a cat on the right"``: keeps captions true to flipped images."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], text)


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * len(table)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None  # None, NaN from pandas
    return value


def normalize_webdataset(table: pa.Table) -> pa.Table:
    """Map WebDataset columns (``__key__``, ``jpg``/``png``, ``txt``, ``json``) to shard columns.

    A Parquet-style table (with ``id``) is returned unchanged.
    """
    if "id" in table.column_names or "__key__" not in table.column_names:
        return table
    n = len(table)
    image: list[Any] = [None] * n
    for ext in WDS_IMAGE_EXTENSIONS:
        for i, value in enumerate(_column(table, ext)):
            if image[i] is None and isinstance(value, bytes):
                image[i] = value
    meta = [_json_meta(v) for v in _column(table, "json")]
    label = [m.get("label") for m in meta]
    return pa.table({
        "id": [_text(k) for k in _column(table, "__key__")],
        "image": pa.array(image, type=pa.binary()),
        "caption": pa.array([_text(v) for v in _column(table, "txt")], type=pa.string()),
        "image_id": pa.array([_opt_str(m.get("image_id")) for m in meta], type=pa.string()),
        "label": pa.array([_opt_int(v) for v in label], type=pa.int64()),
        "domain": pa.array([_opt_str(m.get("domain")) for m in meta], type=pa.string()),
    })


def _opt_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_meta(value: Any) -> dict[str, Any]:
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _common_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """``group`` (the image's identity), ``label`` and ``domain`` of every row; with a shard
    ``group`` column (minimal pairs) also ``pair_group`` (its hash) and ``pair_swap``."""
    ids = _column(table, "id")
    image_ids = _column(table, "image_id")
    group = np.array([stable_hash63(image_name(g, i)) for g, i in zip(image_ids, ids)],
                     dtype=np.int64)
    if "label" in table.column_names:
        label = pc.fill_null(pc.cast(table.column("label"), pa.int64()), -1).to_numpy()
    else:
        label = np.full(len(table), -1, dtype=np.int64)
    domain = np.array([d if isinstance(d, str) else "" for d in _column(table, "domain")],
                      dtype=object)
    out = {"group": group, "label": label.astype(np.int64), "domain": domain}
    if "group" in table.column_names:  # minimal-pair shards: the group and its kind of swap
        out["pair_group"] = np.array([stable_hash63(str(g)) for g in _column(table, "group")],
                                     dtype=np.int64)
        out["pair_swap"] = np.array([str(k) if k is not None else "" for k in
                                     _column(table, "swap")], dtype=object)
    return out


def row_seed(seed: int, epoch: int, row_id: Any) -> np.random.Generator:
    """The augmentation RNG of one row in one pass over the data (epoch = Ray execution index)."""
    return np.random.default_rng([seed & (2**63 - 1), epoch, stable_hash63(str(row_id))])


# Uploads and shard images alike: what decode_image takes (checked from the header, before any
# pixel is decoded). A PNG cannot be decoded at reduced size, so MAX_IMAGE_PIXELS bounds its
# decode (25 M pixels: 75 MB as RGB); a JPEG is decoded at the smallest 1/2/4/8 scale that still
# covers the target (Image.draft), so its memory follows the output size, not the file's.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_IMAGE_SIDE = 12_000  # pixels, either side
MAX_IMAGE_PIXELS = 25_000_000  # width x height
MAX_IMAGE_ASPECT = 20.0  # longer side / shorter side


class ImageRejected(ValueError):
    """Image bytes :func:`decode_image` refuses; ``status`` is the HTTP status that fits (413: too
    large, 415: not JPEG/PNG/WebP, 422: undecodable or too thin) and the message names the
    limit."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # crosses Ray's process boundary with its status
        return type(self), (str(self), self.status)


def check_image_header(img) -> None:
    """Refuse an opened (not yet decoded) PIL image whose format or shape is over a limit."""
    w, h = img.size
    if img.format not in IMAGE_FORMATS:
        raise ImageRejected(f"image format {img.format} is not accepted: send JPEG, PNG or "
                            "WebP", 415)
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise ImageRejected(f"image is {w} x {h} pixels; the limit is {MAX_IMAGE_SIDE} per side "
                            f"and {MAX_IMAGE_PIXELS:,} in all: scale it down", 413)
    if min(w, h) < 1 or max(w, h) > MAX_IMAGE_ASPECT * min(w, h):
        raise ImageRejected(f"image is {w} x {h} pixels; its sides may differ by at most "
                            f"{MAX_IMAGE_ASPECT:g}x: crop it", 422)


def decode_image(
    data: bytes, image_size: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, bool]:
    """Decode + resize (+ random crop and flip when ``rng``) to float32 CHW in [-1, 1].

    Returns the array and whether it was flipped. Format and size are checked from the header
    first (:func:`check_image_header`); PIL's decompression-bomb warning is an error. Raises
    :class:`ImageRejected` on bytes that are over a limit or no image.
    """
    import warnings

    from PIL import Image

    target = math.ceil(image_size * AUGMENT_SCALE) if rng is not None else image_size
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise _unaccepted(data) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected("image has more pixels than PIL's decompression-bomb limit: "
                                "scale it down", 413) from None
        with img:
            check_image_header(img)
            w, h = img.size
            scale = target / min(w, h)
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # JPEG: 1/2/4/8 scale
            try:
                rgb = img.convert("RGB")
            except (OSError, SyntaxError, ValueError) as exc:
                raise ImageRejected(f"not a decodable image ({img.format}: "
                                    f"{_first_line(exc)})", 422) from None
    w, h = rgb.size
    scale = target / min(w, h)
    new_w, new_h = max(target, round(w * scale)), max(target, round(h * scale))
    rgb = rgb.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(rgb, dtype=np.uint8)
    if rng is None:
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    else:
        top = int(rng.integers(0, new_h - image_size + 1))
        left = int(rng.integers(0, new_w - image_size + 1))
    arr = arr[top:top + image_size, left:left + image_size]
    flipped = bool(rng is not None and rng.random() < 0.5)
    if flipped:
        arr = arr[:, ::-1]
    out = arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    return out, flipped


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


# Leading bytes of image formats that decode_image refuses, to name them in the error (PIL's
# parsers of those formats never see the bytes).
_OTHER_FORMATS = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
                  b"MM\x00*": "TIFF", b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD"}


def _unaccepted(data: bytes) -> ImageRejected:
    """Why PIL could not open ``data`` as JPEG/PNG/WebP: another image format (415), or none."""
    for magic, name in _OTHER_FORMATS.items():
        if data.startswith(magic):
            return ImageRejected(f"image format {name} is not accepted: send JPEG, PNG or WebP",
                                 415)
    return ImageRejected("not a decodable image: send a JPEG, PNG or WebP file", 422)


def preprocess_images(
    table: pa.Table,
    *,
    image_size: int,
    max_text_len: int,
    encode: TextEncoder,
    augment: bool,
    seed: int,
    epoch: int = 0,
    hard_negatives: str = "none",
    k: int = 0,
) -> dict[str, np.ndarray]:
    """Image-caption batch -> ``pixel_values``, ``input_ids``, ``attention_mask``, ``group``,
    ``label``, ``domain``, ``valid``, ``drop_reason``; with ``hard_negatives`` (a perturber
    kind of :mod:`raycmr.data.perturb`) also ``neg_input_ids``, ``neg_attention_mask``
    [n, k, max_text_len] and ``neg_valid`` [n, k] (:func:`hard_negative_columns`).

    ``encode(texts, max_len) -> (input_ids, attention_mask)`` tokenizes (see
    :func:`raycmr.data.text.load_text_encoder`). With
    ``augment``, images get a seeded random crop and horizontal flip; a flipped image's caption
    has "left" and "right" swapped so that it still describes the image.
    """
    table = normalize_webdataset(table)
    n = len(table)
    pixels = np.zeros((n, 3, image_size, image_size), dtype=np.float32)
    valid = np.ones(n, dtype=bool)
    reasons = np.array([""] * n, dtype=object)
    ids = _column(table, "id")
    images = _column(table, "image")
    captions = [_text(c) for c in _column(table, "caption")]
    texts: list[str] = []
    for i in range(n):
        text = captions[i].strip() if captions[i] is not None else ""
        reason = ""
        if images[i] is None:
            reason = "null_image"
        else:
            rng = row_seed(seed, epoch, ids[i]) if augment else None
            try:
                pixels[i], flipped = decode_image(images[i], image_size, rng)
                if flipped:
                    text = swap_left_right(text)
            except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                reason = "undecodable_image"
        if not reason and not text:
            reason = "empty_caption"
        if reason:
            valid[i], reasons[i] = False, reason
            pixels[i] = 0.0
            text = ""
        texts.append(text)
    input_ids, attention = encode(texts, max_text_len)
    input_ids[~valid] = 0
    attention[~valid] = 0
    out = {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention,
           **_common_columns(table), "valid": valid, "drop_reason": reasons}
    if hard_negatives != "none":
        rngs = [row_seed(seed + 1, epoch, i) for i in ids]  # not the augmentation's stream
        out.update(hard_negative_columns(texts, rngs, hard_negatives, k, encode, max_text_len))
    return out


def hard_negative_columns(texts: list[str], rngs: list[np.random.Generator], kind: str, k: int,
                          encode: TextEncoder, max_text_len: int) -> dict[str, np.ndarray]:
    """Up to ``k`` perturbed captions of each text (``kind``: a key of
    :data:`raycmr.data.perturb.PERTURBERS`), tokenized: ``neg_input_ids``,
    ``neg_attention_mask`` [n, k, max_text_len] and ``neg_valid`` [n, k] (False where the
    perturber found fewer than k; an empty text gets none)."""
    from raycmr.data.perturb import PERTURBERS

    perturb = PERTURBERS[kind]
    n = len(texts)
    negs = [perturb(t, k, rng) if t else [] for t, rng in zip(texts, rngs)]
    flat = [(row[j] if j < len(row) else "") for row in negs for j in range(k)]
    ids, mask = encode(flat, max_text_len) if flat else (np.zeros((0, max_text_len), np.int64),) * 2
    valid = np.array([[j < len(row) for j in range(k)] for row in negs], dtype=bool).reshape(n, k)
    ids, mask = ids.reshape(n, k, max_text_len), mask.reshape(n, k, max_text_len)
    ids[~valid] = 0
    mask[~valid] = 0
    return {"neg_input_ids": ids, "neg_attention_mask": mask, "neg_valid": valid}


def _feature_matrix(column: pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix [n, dim] float32 zero-filled, reason per row: "" / null / bad dim / NaN)``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
    lengths = lengths.astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])
    out = np.zeros((n, dim), dtype=np.float32)
    reason = np.array([""] * n, dtype=object)
    ok = lengths == dim
    if ok.any():
        out[ok] = flat[starts[ok, None] + np.arange(dim)]
    reason[lengths == -1] = "null_feature"
    reason[(lengths != -1) & ~ok] = "bad_feature_dim"
    finite = np.isfinite(out).all(axis=1)
    reason[ok & ~finite] = "nan_feature"
    out[reason != ""] = 0.0
    return out, reason


def preprocess_features(
    table: pa.Table, *, image_dim: int, text_dim: int
) -> dict[str, np.ndarray]:
    """Feature batch -> ``image_feat``, ``text_feat`` (float32), ``group``, ``label``,
    ``domain``, ``valid``, ``drop_reason``. Rows with null, NaN/inf or wrong-length vectors are
    marked invalid (``null_feature``, ``nan_feature``, ``bad_feature_dim``)."""
    img, img_reason = _feature_matrix(table.column("image_feat"), image_dim)
    txt, txt_reason = _feature_matrix(table.column("text_feat"), text_dim)
    reasons = np.where(img_reason != "", img_reason, txt_reason).astype(object)
    valid = reasons == ""
    img[~valid] = 0.0
    txt[~valid] = 0.0
    return {"image_feat": img, "text_feat": txt, **_common_columns(table),
            "valid": valid, "drop_reason": reasons}
