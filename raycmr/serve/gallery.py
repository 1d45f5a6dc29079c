"""The gallery's own images and captions, read from its shards for the search page: image
bytes by gallery id (thumbnails) and every caption with its image id (image -> text search).

Gallery ids are named as the index names them (:func:`raycmr.data.scan.image_name`): the
shard's ``image_id``, else the row ``id``. Parquet shards are located by (file, row group, row);
WebDataset tars by the byte range of each image member, so one thumbnail reads one row group or
one member.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp",
               b"GIF8": "image/gif"}


def image_type(data: bytes) -> str:
    """The MIME type of encoded image bytes by their magic number."""
    for magic, mime in IMAGE_TYPES.items():
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


@dataclass
class GalleryStore:
    """Where each gallery image lives in the shards, and the captions."""

    files: list[str]
    fmt: str  # "parquet" or "webdataset"
    where: dict[str, tuple] = field(default_factory=dict)  # id -> (file, location in the file)
    captions: list[tuple[str, str]] = field(default_factory=list)  # (image id, caption)

    @classmethod
    def scan(cls, shards: list[str]) -> GalleryStore:
        """Scan image shards (ids, captions; not the image bytes) with
        :func:`raycmr.data.scan.scan_shard`."""
        from raycmr.data.scan import scan_shard
        from raycmr.data.schema import check_shards

        info = check_shards(shards, "images")
        store = cls(info.files, info.format)
        for f, file in enumerate(info.files):
            for row in scan_shard(file, info.format, captions=True):
                if row.where is None:  # a WebDataset sample without an image
                    continue
                store.where.setdefault(row.name, (f, *row.where))
                if row.caption and row.caption.strip():
                    store.captions.append((row.name, row.caption.strip()))
        return store

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
