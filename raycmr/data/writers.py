"""Writing Parquet shards: a rolling :class:`ShardWriter` and writers for a folder of images with
a captions file and for the Wikipedia feature set."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycmr.data.paths import split_uri
from raycmr.data.schema import OPTIONAL_COLUMNS, feature_shard_schema, image_shard_schema
from raycmr.reporting.bars import RowsBar

if TYPE_CHECKING:
    from typing_extensions import Self

MAX_EXAMPLES = 3  # rejected records remembered per reason, for the summary


@dataclass
class WriteSummary:
    """What a writer produced: rows, shard files, bytes, and rejected records by reason."""

    rows: int = 0
    shards: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list, repr=False)
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict, repr=False)  # first few by reason

    def merge(self, other: WriteSummary) -> WriteSummary:
        """A new summary adding ``other`` to this one."""
        out = WriteSummary(
            self.rows + other.rows,
            self.shards + other.shards,
            self.bytes + other.bytes,
            self.files + other.files,
            self.rejected + other.rejected,
            {k: list(v) for k, v in self.examples.items()},
        )
        for reason, items in other.examples.items():
            out.examples.setdefault(reason, []).extend(items)
            out.examples[reason] = out.examples[reason][:MAX_EXAMPLES]
        return out

    def format(self, name: str = "") -> str:
        """One line for the rows, shards and bytes, one more per rejection reason."""
        head = f"{name + ': ' if name else ''}{self.rows} rows, {self.shards} shards, "
        head += f"{self.bytes / 1e6:.2f} MB, {sum(self.rejected.values())} rejected"
        lines = [head]
        for reason, count in sorted(self.rejected.items()):
            examples = ", ".join(self.examples.get(reason, []))
            lines.append(f"  rejected {reason}: {count}" + (f" (e.g. {examples})" if examples else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "shards": self.shards,
            "bytes": self.bytes,
            "rejected": dict(self.rejected),
        }


def prepare_shard_dir(out_dir: str | Path, overwrite: bool = False) -> None:
    """Create ``out_dir``; existing ``part-*.parquet`` files are an error unless ``overwrite``
    (then they are deleted), so stale shards never mix in."""
    fs, inner, prefix = split_uri(str(out_dir))
    fs.create_dir(inner, recursive=True)
    infos = fs.get_file_info(pafs.FileSelector(inner))
    stale = [i.path for i in infos if i.base_name.startswith("part-")
             and i.base_name.endswith(".parquet")]
    if stale and not overwrite:
        raise FileExistsError(
            f"'{prefix}{inner}' already holds {len(stale)} shard(s); remove them, "
            "choose another --out, or pass --overwrite"
        )
    for path in stale:
        fs.delete_file(path)


class ShardWriter:
    """Buffers rows and writes ``out_dir/part-00000.parquet``, ... every ``rows_per_shard`` rows.

    Use as a context manager, or call :meth:`close`; the summary is in :attr:`summary`.
    ``out_dir`` may be local or an ``s3://``/``gs://`` URI. Existing ``part-*.parquet`` files are
    an error unless ``overwrite`` (then they are deleted), so stale shards never mix in.
    """

    def __init__(
        self,
        out_dir: str | Path,
        schema: pa.Schema,
        rows_per_shard: int = 1000,
        *,
        overwrite: bool = False,
        progress: str | None = None,
        total: int | None = None,
        first_shard: int = 0,
    ) -> None:
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.summary = WriteSummary()
        self._fs, self._dir, self._prefix = split_uri(str(out_dir))
        self._buffer: list[dict[str, Any]] = []
        # rows/s on the terminal while writing (``progress`` names the bar; None: quiet)
        self._progress = RowsBar(progress, total) if progress is not None else None
        # one of several writers filling one folder (:func:`prepare_shard_dir` ran before):
        # its files start at part-{first_shard}
        self._first_shard = first_shard
        if first_shard == 0:
            prepare_shard_dir(out_dir, overwrite)

    def write(self, row: dict[str, Any]) -> None:
        """Add one row (a dict with the schema's columns; missing optional ones become null)."""
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self._flush()
        if self._progress is not None:
            rejected = self.rejected_count
            self._progress.update(self.summary.rows + len(self._buffer),
                                  f"{rejected} rejected" if rejected else "")

    def reject(self, reason: str, record: str = "") -> None:
        """Count a record that was not written, by reason (with the record named as an example)."""
        self.summary.rejected[reason] += 1
        examples = self.summary.examples.setdefault(reason, [])
        if record and len(examples) < MAX_EXAMPLES:
            examples.append(record)

    @property
    def rejected_count(self) -> int:
        return sum(self.summary.rejected.values())

    def _flush(self) -> None:
        if not self._buffer:
            return
        columns = {name: [r.get(name) for r in self._buffer] for name in self.schema.names}
        table = pa.table(columns, schema=self.schema)
        path = f"{self._dir}/part-{self._first_shard + self.summary.shards:05d}.parquet"
        pq.write_table(table, path, filesystem=self._fs)
        self.summary.bytes += self._fs.get_file_info(path).size
        self.summary.files.append(self._prefix + path)
        self.summary.shards += 1
        self.summary.rows += len(self._buffer)
        self._buffer = []

    def close(self) -> WriteSummary:
        """Write the last partial shard and return the summary."""
        self._flush()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        return self.summary

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- folder of images


def read_captions_file(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records and column names of a ``.csv``/``.tsv`` or ``.jsonl`` captions file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            records = list(reader)
            columns = list(reader.fieldnames or [])
    elif suffix in (".jsonl", ".json", ".ndjson"):
        records, columns = [], []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"captions file '{path}' line {lineno}: bad JSON ({exc})") \
                        from None
                records.append(record)
                columns.extend(k for k in record if k not in columns)
    else:
        raise ValueError(f"captions file '{path}' must end in .csv, .tsv or .jsonl")
    missing = [c for c in ("image", "caption") if c not in columns]
    if missing:
        raise ValueError(
            f"captions file '{path}' lacks column(s) {', '.join(missing)} (has: "
            f"{', '.join(columns)}); it needs 'image' (file name under the image folder) and "
            "'caption'"
        )
    return records, columns


def _check_image(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        return False


def _label(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


def write_folder_shards(
    image_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    rows_per_shard: int = 1000,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Image shards from a folder of images plus a CSV/JSONL captions file.

    Columns of the captions file: ``image`` (file name relative to ``image_dir``), ``caption``,
    optional ``id``, ``image_id`` (default: the image file name, so captions of one file share
    it), ``label``, ``domain``. Records are rejected and counted by reason: ``missing_file``,
    ``undecodable_image``, ``empty_caption``, ``bad_label``. Image bytes are stored as they are.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder '{image_dir}' does not exist")
    records, columns = read_captions_file(captions_file)
    optional = ["image_id"] + [c for c in ("label", "domain") if c in columns]
    writer = ShardWriter(out_dir, image_shard_schema(optional), rows_per_shard,
                         overwrite=overwrite, progress="folder" if progress else None,
                         total=len(records))
    with writer:
        for index, record in enumerate(records):
            name = str(record.get("image") or "")
            where = f"record {index} ({name or 'no image'})"
            caption = record.get("caption")
            caption = caption.strip() if isinstance(caption, str) else ""
            file = image_dir / name
            if not name or not file.is_file():
                writer.reject("missing_file", where)
                continue
            data = file.read_bytes()
            if not _check_image(data):
                writer.reject("undecodable_image", where)
                continue
            if not caption:
                writer.reject("empty_caption", where)
                continue
            try:
                label = _label(record.get("label"))
            except (TypeError, ValueError):
                writer.reject("bad_label", where)
                continue
            writer.write({
                "id": str(record.get("id") or f"{index:08d}"),
                "image": data,
                "caption": caption,
                "image_id": str(record.get("image_id") or name),
                "label": label,
                "domain": record.get("domain"),
            })
    return writer.summary


# ------------------------------------------------------------------------------------ wikipedia


def _read_list(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            text_id, image_id, cls = line.split("\t")
            rows.append((text_id.strip(), image_id.strip(), int(cls)))
    return rows


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing ``round(fraction * n_c)`` rows of every class ``c`` (seeded)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        take = round(fraction * len(rows))
        mask[rng.permutation(rows)[:take]] = True
    return mask


def write_wikipedia_shards(
    src_dir: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.15,
    seed: int = 0,
    *,
    rows_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict[str, WriteSummary]:
    """Feature shards ``out_dir/{train,val,test}`` from the Wikipedia set (Rasiwasia et al. 2010).

    Reads ``raw_features.mat`` (I_tr/T_tr/I_te/T_te) and the ``*_txt_img_cat.list`` files; labels
    1..10 are stored as 0..9; ``val`` is a stratified, seeded ``val_fraction`` of the training
    pairs, ``test`` is the published test split untouched. ``id`` is the text id and ``image_id``
    the image id of each pair.
    """
    from scipy.io import loadmat

    src = Path(src_dir)
    mat_path = src / "raw_features.mat"
    if not mat_path.is_file():
        raise FileNotFoundError(
            f"'{mat_path}' does not exist; point --src at the wikipedia folder holding "
            "raw_features.mat and the .list files"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    mat = loadmat(str(mat_path))
    parts = {
        "train": (mat["I_tr"], mat["T_tr"], _read_list(src / "trainset_txt_img_cat.list")),
        "test": (mat["I_te"], mat["T_te"], _read_list(src / "testset_txt_img_cat.list")),
    }
    for name, (img, txt, rows) in parts.items():
        if not len(img) == len(txt) == len(rows):
            raise ValueError(f"wikipedia {name}: {len(img)} image rows, {len(txt)} text rows, "
                             f"{len(rows)} list lines; the files do not match")
    img, txt, rows = parts["train"]
    val_mask = stratified_split(np.array([r[2] for r in rows]), val_fraction, seed)
    splits = {
        "train": (img[~val_mask], txt[~val_mask], [r for r, m in zip(rows, val_mask) if not m]),
        "val": (img[val_mask], txt[val_mask], [r for r, m in zip(rows, val_mask) if m]),
        "test": parts["test"],
    }
    schema = feature_shard_schema(OPTIONAL_COLUMNS[:2])  # image_id, label
    out: dict[str, WriteSummary] = {}
    for name, (img, txt, rows) in splits.items():
        img32, txt32 = img.astype(np.float32), txt.astype(np.float32)
        writer = ShardWriter(f"{out_dir}/{name}", schema, rows_per_shard, overwrite=overwrite,
                             progress=f"wikipedia {name}", total=len(rows))
        with writer:
            for i, (text_id, image_id, cls) in enumerate(rows):
                writer.write({"id": text_id, "image_feat": img32[i], "text_feat": txt32[i],
                              "image_id": image_id, "label": cls - 1})
        out[name] = writer.summary
    return out
