"""Shard schemas and the driver-side check that runs before any training.

Image shards (``data.kind=images``, Parquet): ``id`` string, ``image`` encoded JPEG/PNG bytes,
``caption`` string, optional ``image_id`` string (captions of one image share it), ``label`` int,
``domain`` string. Feature shards (``data.kind=features``): ``id``, ``image_feat`` and
``text_feat`` list<float32>, the same optional columns. WebDataset tars (image kind only) hold
``key.jpg``/``key.png`` + ``key.txt`` [+ ``key.json`` with image_id/label/domain].
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raycmr.data.paths import (
    PARQUET_EXTENSIONS,
    SHARD_EXTENSIONS,
    TAR_EXTENSIONS,
    ShardReadError,
    detect_format,
    open_tar,
    resolve_paths,
    split_uri,
)

OPTIONAL_COLUMNS = ("image_id", "label", "domain")
REQUIRED_COLUMNS = {
    "images": ("id", "image", "caption"),
    "features": ("id", "image_feat", "text_feat"),
}
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_FIX = {
    "images": "write shards with `raycmr shards synthetic|folder` or rename the columns to "
    "id, image, caption",
    "features": "write shards with `raycmr shards wikipedia` or rename the columns to "
    "id, image_feat, text_feat",
}

WDS_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # as WebDataset splits key.ext
_OPTIONAL_TYPES = {"image_id": pa.string(), "label": pa.int64(), "domain": pa.string(),
                   # minimal-pair shards (raycmr shards synthetic --minimal-pairs): the rows of
                   # one group differ in one binding; swap says which kind
                   "group": pa.string(), "swap": pa.string()}


class ShardSchemaError(ValueError):
    """A shard lacks required columns or has wrong column types; the message names the fix."""


@dataclass
class ShardInfo:
    """What the driver learnt about a split before building its pipeline."""

    files: list[str]
    format: str  # "parquet" or "webdataset"
    columns: list[str]  # columns of the first file (for webdataset: canonical names found)


def wds_image_id(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    """The ``image_id`` of a WebDataset sample's ``.json`` member, None when it has none (or
    the member is not a JSON object)."""
    try:
        meta = json.loads(tar.extractfile(member).read())
    except ValueError:
        return None
    return meta.get("image_id") if isinstance(meta, dict) else None


def image_shard_schema(optional: Iterable[str] = OPTIONAL_COLUMNS) -> pa.Schema:
    """Arrow schema of an image shard with the given optional columns."""
    fields = [("id", pa.string()), ("image", pa.binary()), ("caption", pa.string())]
    return pa.schema(fields + [(c, _OPTIONAL_TYPES[c]) for c in optional])


def feature_shard_schema(optional: Iterable[str] = OPTIONAL_COLUMNS) -> pa.Schema:
    """Arrow schema of a feature shard with the given optional columns."""
    fields = [
        ("id", pa.string()),
        ("image_feat", pa.list_(pa.float32())),
        ("text_feat", pa.list_(pa.float32())),
    ]
    return pa.schema(fields + [(c, _OPTIONAL_TYPES[c]) for c in optional])


@contextlib.contextmanager
def _reading(path: str, errors: tuple[type[BaseException], ...], what: str,
             fix: str) -> Iterator[None]:
    """Turn a missing file or one of ``errors`` into one :class:`ShardReadError` line naming
    ``path``, what it should have been and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise ShardReadError(f"shard file '{path}' does not exist") from None
    except errors as exc:
        raise ShardReadError(f"shard file '{path}' is not a readable {what} ({exc}); {fix}") \
            from None


def read_parquet_schema(path: str) -> pa.Schema:
    """The Arrow schema of one Parquet file, or a :class:`ShardReadError` naming it."""
    fs, inner, _ = split_uri(path)
    with _reading(path, (pa.ArrowException, OSError, ValueError), "Parquet file",
                  "it may be truncated or not Parquet: rewrite it (raycmr shards ...) or remove "
                  "it from the split, or set data.format"):
        return pq.read_schema(inner, filesystem=fs)


def _type_problem(column: str, typ: pa.DataType) -> str | None:
    if column == "image" and not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        return f"column 'image' has type {typ}, expected binary (encoded JPEG/PNG bytes)"
    if column == "caption" and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return f"column 'caption' has type {typ}, expected string"
    if column in ("image_feat", "text_feat"):
        is_list = (
            pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
        )
        if not is_list or not pa.types.is_floating(typ.value_type):
            return f"column '{column}' has type {typ}, expected list<float32>"
    if column == "label" and not pa.types.is_integer(typ):
        return f"column 'label' has type {typ}, expected an integer type"
    return None


def check_schema(schema: pa.Schema, kind: str, path: str) -> None:
    """Raise :class:`ShardSchemaError` if ``schema`` misses a required column or has bad types."""
    if kind not in REQUIRED_COLUMNS:
        raise ShardSchemaError(f"data.kind is '{kind}'; choose images or features")
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in schema.names]
    if missing:
        raise ShardSchemaError(
            f"shard '{path}' is missing column(s) {', '.join(repr(c) for c in missing)} "
            f"needed for data.kind={kind} (has: {', '.join(schema.names)}); {_FIX[kind]}"
        )
    for name in REQUIRED_COLUMNS[kind] + OPTIONAL_COLUMNS:
        if name in schema.names:
            problem = _type_problem(name, schema.field(name).type)
            if problem:
                raise ShardSchemaError(f"shard '{path}': {problem}; {_FIX[kind]}")


def peek_webdataset(path: str, max_members: int = 64) -> dict[str, bytes]:
    """The members of the first sample of a WebDataset tar, by extension (``{"jpg": b...}``)."""
    fs, inner, _ = split_uri(path)
    sample: dict[str, bytes] = {}
    key = None
    with _reading(path, (tarfile.TarError, OSError, EOFError), "tar file",
                  "check the path or set data.format"), open_tar(fs, inner) as tar:
        for i, member in enumerate(tar):
            if i >= max_members:
                break
            if not member.isreg():
                continue
            match = WDS_KEY_EXT.match(member.name)
            if not match:
                continue
            this_key, ext = match.group(1), match.group(2)
            if key is not None and this_key != key:
                break
            key = this_key
            sample[ext.lower()] = tar.extractfile(member).read()
    return sample


def check_webdataset(path: str, kind: str) -> list[str]:
    """Check the first sample of a WebDataset tar; returns the canonical columns it provides."""
    if kind != "images":
        raise ShardSchemaError(
            f"shard '{path}' is a WebDataset tar but data.kind={kind}; feature shards must be "
            "Parquet (`raycmr shards wikipedia`)"
        )
    sample = peek_webdataset(path)
    has_image = any(e in sample for e in WDS_IMAGE_EXTENSIONS)
    missing = ([] if has_image else ["key.jpg/key.png"]) + ([] if "txt" in sample else ["key.txt"])
    if missing:
        raise ShardSchemaError(
            f"shard '{path}' first sample is missing {', '.join(missing)} (has: "
            f"{', '.join(sorted(sample)) or 'nothing'}); write tars as img2dataset does: "
            "key.jpg + key.txt [+ key.json]"
        )
    return ["id", "image", "caption"] + (list(OPTIONAL_COLUMNS) if "json" in sample else [])


def check_shards(paths: list[str] | str, kind: str, fmt: str = "auto") -> ShardInfo:
    """Resolve ``paths`` and check the first file's schema on the driver.

    Raises :class:`ShardReadError` (missing path, unreadable file) or :class:`ShardSchemaError`
    (missing or mistyped columns), each with a one-line message naming the file and the fix.
    """
    extensions = {"parquet": PARQUET_EXTENSIONS, "webdataset": TAR_EXTENSIONS}
    files = resolve_paths(paths, extensions.get(fmt, SHARD_EXTENSIONS))
    fmt = detect_format(files, fmt)
    if fmt == "webdataset":
        return ShardInfo(files, fmt, check_webdataset(files[0], kind))
    # every file's footer: a truncated shard or one missing a column anywhere in the split is
    # named here, on the driver, rather than failing inside a Ray Data task mid-epoch
    schemas = [read_parquet_schema(f) for f in files]
    for file, schema in zip(files, schemas, strict=True):
        check_schema(schema, kind, file)
    return ShardInfo(files, fmt, list(schemas[0].names))
