"""The gallery's own images and captions, read from its shards for the search page: image
bytes by gallery id (thumbnails) and every caption with its image id (image -> text search).

Gallery ids are named as :mod:`raycmr.index.gallery` names them: the shard's ``image_id``, else
the row ``id``. Parquet shards are located by (file, row group, row); WebDataset tars by the
byte range of each image member, so one thumbnail reads one row group or one member.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field

IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp",
               b"GIF8": "image/gif"}


def image_type(data: bytes) -> str:
    """The MIME type of encoded image bytes by their magic number."""
    for magic, mime in IMAGE_TYPES.items():
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


def _key(image_id, row_id) -> str:
    return str(image_id) if image_id not in (None, "") else str(row_id)


@dataclass
class GalleryStore:
    """Where each gallery image lives in the shards, and the captions."""

    files: list[str]
    fmt: str  # "parquet" or "webdataset"
    where: dict[str, tuple] = field(default_factory=dict)  # id -> location in its file
    captions: list[tuple[str, str]] = field(default_factory=list)  # (image id, caption)

    @classmethod
    def scan(cls, shards: list[str]) -> GalleryStore:
        """Scan image shards (ids, captions; not the image bytes)."""
        from raycmr.data.schema import check_shards

        info = check_shards(shards, "images")
        store = cls(info.files, info.format)
        for f, file in enumerate(info.files):
            if info.format == "webdataset":
                store._scan_tar(f, file)
            else:
                store._scan_parquet(f, file)
        return store

    def _scan_parquet(self, f: int, file: str) -> None:
        import pyarrow.parquet as pq

        from raycmr.data.paths import split_uri

        fs, inner, _ = split_uri(file)
        pf = pq.ParquetFile(inner, filesystem=fs)
        columns = [c for c in ("id", "image_id", "caption") if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            cols = pf.read_row_group(rg, columns=columns).to_pydict()
            n = len(cols["id"])
            for i, (row_id, image_id, caption) in enumerate(zip(
                    cols["id"], cols.get("image_id", [None] * n), cols.get("caption", [None] * n))):
                key = _key(image_id, row_id)
                self.where.setdefault(key, (f, rg, i))
                if caption and caption.strip():
                    self.captions.append((key, caption.strip()))

    def _scan_tar(self, f: int, file: str) -> None:
        from raycmr.data.paths import split_uri
        from raycmr.data.schema import WDS_IMAGE_EXTENSIONS, WDS_KEY_EXT, wds_image_id

        fs, inner, _ = split_uri(file)
        images: dict[str, tuple[int, int]] = {}
        texts: dict[str, str] = {}
        ids: dict[str, str] = {}
        with fs.open_input_file(inner) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in tar:
                match = WDS_KEY_EXT.match(member.name) if member.isreg() else None
                if not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if ext in WDS_IMAGE_EXTENSIONS:
                    images.setdefault(key, (member.offset_data, member.size))
                elif ext == "txt":
                    texts[key] = tar.extractfile(member).read().decode("utf-8", "replace")
                elif ext == "json" and (image_id := wds_image_id(tar, member)) is not None:
                    ids[key] = str(image_id)
        for key, (offset, size) in images.items():
            name = _key(ids.get(key), key)
            self.where.setdefault(name, (f, offset, size))
            if texts.get(key, "").strip():
                self.captions.append((name, texts[key].strip()))

    def image(self, image_id: str) -> bytes | None:
        """The encoded bytes of one gallery image; None for an id not in the gallery."""
        loc = self.where.get(image_id)
        if loc is None:
            return None
        from raycmr.data.paths import split_uri

        fs, inner, _ = split_uri(self.files[loc[0]])
        if self.fmt == "webdataset":
            with fs.open_input_file(inner) as stream:
                stream.seek(loc[1])
                return stream.read(loc[2])
        import pyarrow.parquet as pq

        table = pq.ParquetFile(inner, filesystem=fs).read_row_group(loc[1], columns=["image"])
        return table.column("image")[loc[2]].as_py()
