"""One pass over a shard file's rows without their pixels: each row's image name, where its
image bytes lie, and (on request) its caption. The index (the gallery's rows,
:func:`raycmr.index.gallery_store.scan_gallery_rows`) and the Serve app (thumbnails and captions,
:class:`raycmr.serve.gallery.GalleryStore`) both read shards through :func:`scan_shard`.

A row's name is its ``image_id``, else its row ``id`` (:func:`image_name`): the string the Ray
Data pipeline hashes into ``group``, so a name found here and a pipeline row agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple


def image_name(image_id: Any, row_id: Any) -> str:
    """The name of a row's image: its ``image_id``, else its row ``id``."""
    return str(image_id) if image_id not in (None, "") else str(row_id)


class ShardRow(NamedTuple):
    """One row of a shard (a WebDataset sample is a row)."""

    name: str  # image_name(image_id, id)
    where: tuple[int, int] | None  # parquet: (row group, row); webdataset: (byte offset, size)
    #                                of the image member, None for a sample without one
    caption: str | None  # with captions=True; None otherwise or when the row has none


def scan_shard(file: str, fmt: str, *, captions: bool = False) -> Iterator[ShardRow]:
    """The rows of one shard ``file`` (``fmt``: ``parquet`` or ``webdataset``) in file order,
    read without their image bytes; ``captions`` also reads each row's caption."""
    if fmt == "webdataset":
        yield from _scan_tar(file, captions)
    else:
        yield from _scan_parquet(file, captions)


def _scan_parquet(file: str, captions: bool) -> Iterator[ShardRow]:
    import pyarrow.parquet as pq

    from raycmr.data.paths import split_uri

    fs, inner, _ = split_uri(file)
    pf = pq.ParquetFile(inner, filesystem=fs)
    wanted = ("id", "image_id", "caption") if captions else ("id", "image_id")
    columns = [c for c in wanted if c in pf.schema_arrow.names]
    for rg in range(pf.num_row_groups):
        cols = pf.read_row_group(rg, columns=columns).to_pydict()
        n = len(cols["id"])
        for i, (row_id, image_id, caption) in enumerate(zip(
                cols["id"], cols.get("image_id", [None] * n), cols.get("caption", [None] * n))):
            yield ShardRow(image_name(image_id, row_id), (rg, i), caption)


def _scan_tar(file: str, captions: bool) -> Iterator[ShardRow]:
    from raycmr.data.paths import open_tar, split_uri
    from raycmr.data.schema import WDS_IMAGE_EXTENSIONS, WDS_KEY_EXT, wds_image_id

    fs, inner, _ = split_uri(file)
    keys: dict[str, None] = {}  # in order of first member
    images: dict[str, tuple[int, int]] = {}
    texts: dict[str, str] = {}
    ids: dict[str, Any] = {}
    with open_tar(fs, inner) as tar:  # .tar only (paths.TAR_EXTENSIONS): offsets are the file's
        for member in tar:
            match = WDS_KEY_EXT.match(member.name) if member.isreg() else None
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            keys.setdefault(key)
            if ext in WDS_IMAGE_EXTENSIONS:
                images.setdefault(key, (member.offset_data, member.size))
            elif ext == "txt" and captions:
                texts[key] = tar.extractfile(member).read().decode("utf-8", "replace")
            elif ext == "json" and (image_id := wds_image_id(tar, member)) is not None:
                ids[key] = image_id
    for key in keys:
        yield ShardRow(image_name(ids.get(key), key), images.get(key), texts.get(key))
