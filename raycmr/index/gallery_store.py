"""A gallery's embeddings on their way into FAISS without passing through the driver's memory.

The driver holds only the FAISS index it builds, the id table (compact Arrow strings) and
fixed-size chunks, never every embedding:

1. :func:`scan_gallery_rows` reads the shards' ids (no pixels;
   :func:`raycmr.data.scan.scan_shard`) into :class:`GalleryRows`: index row ``i`` is the
   ``i``-th image id in sorted order, so a rebuild gives the same rows whatever order Ray Data
   returns batches in;
2. :class:`EmbeddingBlockWriter` runs in each Ray Data actor: it embeds a batch, maps each image
   to its index row, keeps one copy per image and writes the block (rows + float32 vectors)
   into a scratch folder beside the index; only a count goes back to the driver;
3. :func:`assemble_embeddings` copies each block to its rows of one float32 ``[N, d]`` file on
   local disk through a memory map opened per block (the pages belong to the page cache, not
   to the driver);
4. :func:`build_index_from_file` trains IVF on a sample of rows and adds the vectors chunk by
   chunk (:data:`ADD_CHUNK` rows read with a plain file read).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from raycmr import artifacts

ADD_CHUNK = 65_536  # rows per FAISS add: 32 MB at dim 128
BLOCK_PREFIX = "emb-"


class RowLookup:
    """``group`` hash -> index row, vectorised: what each embedding actor needs of the gallery
    (the ids themselves stay on the driver)."""

    def __init__(self, groups: np.ndarray):
        self._order = np.argsort(groups, kind="stable")
        self._sorted = groups[self._order]

    def __call__(self, groups: np.ndarray) -> np.ndarray:
        """Index row of each ``group`` (-1 for a group not in the gallery)."""
        groups = np.asarray(groups, dtype=np.int64)
        if len(self._sorted) == 0:
            return np.full(len(groups), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, groups), len(self._sorted) - 1)
        return np.where(self._sorted[at] == groups, self._order[at], -1).astype(np.int64)


class GalleryRows:
    """Index rows of a gallery: ``names`` (a pyarrow string array, sorted), ``groups`` (int64:
    the ``group`` hash of each name, the key the Ray Data pipeline gives every row) and
    ``lookup`` (:class:`RowLookup`: groups -> rows)."""

    def __init__(self, names: Any, groups: np.ndarray):
        self.names = names
        self.groups = np.asarray(groups, dtype=np.int64)
        self.lookup = RowLookup(self.groups)

    def __len__(self) -> int:
        return len(self.groups)


def scan_gallery_rows(files: list[str], fmt: str) -> GalleryRows:
    """The gallery's images (one per ``image_id``, else per row ``id``) in sorted id order, read
    file by file: the driver keeps two arrays, never a per-image Python object."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from raycmr.data.scan import scan_shard
    from raycmr.data.transforms import stable_hash63

    names, groups = [], []
    for file in files:
        found: dict[int, str] = {}  # group -> name, one per image
        for row in scan_shard(file, fmt):
            found.setdefault(stable_hash63(row.name), row.name)
        groups.append(np.fromiter(found, dtype=np.int64, count=len(found)))
        names.append(pa.array(list(found.values()), type=pa.string()))
    if not groups:
        return GalleryRows(pa.array([], type=pa.string()), np.zeros(0, np.int64))
    all_groups = np.concatenate(groups)
    _, first = np.unique(all_groups, return_index=True)  # an image split across files: once
    all_names = pa.chunked_array(names, type=pa.string()).take(pa.array(first))
    order = pc.sort_indices(all_names).to_numpy()
    return GalleryRows(all_names.take(pa.array(order)).combine_chunks(), all_groups[first][order])


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class EmbeddingBlockWriter:
    """A picklable model factory for :func:`~raycmr.data.inference.run_batch_inference`: in an
    actor it builds ``embedder`` (a :class:`~raycmr.evaluate.embedding.DualEncoderEmbedder`
    with ``images_only``), maps groups to index rows with ``lookup`` (a :class:`RowLookup` or
    its object ref) and returns a function from a decoded batch to ``pairs`` (the batch's
    valid rows) and ``images`` (the gallery images it wrote), one output row per batch. The
    embeddings go to ``scratch/emb-<hex>.npz`` (``rows`` int64, ``vectors`` float32)."""

    def __init__(self, embedder: Any, lookup: Any, scratch: str):
        self.embedder, self.lookup, self.scratch = embedder, lookup, str(scratch)

    def __call__(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        import ray

        embed = self.embedder()
        lookup = ray.get(self.lookup) if isinstance(self.lookup, ray.ObjectRef) else self.lookup
        scratch = self.scratch

        def write(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = embed(batch)
            row = lookup(out["group"])
            kept, first = np.unique(row, return_index=True)  # each image once per batch
            first = first[kept >= 0]
            if len(first):
                name = f"{BLOCK_PREFIX}{uuid.uuid4().hex}.npz"
                artifacts.write_bytes(artifacts.join(scratch, name), _npz_bytes(
                    rows=row[first], vectors=np.ascontiguousarray(out["img"][first],
                                                                  dtype=np.float32)))
            return {"pairs": np.array([len(row)], np.int64),
                    "images": np.array([len(first)], np.int64)}

        return write


def _blocks(scratch: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, vectors)`` of every block in ``scratch``, one at a time."""
    import pyarrow.fs as pafs

    fs, root = artifacts.split(scratch)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.base_name.startswith(BLOCK_PREFIX):
            with np.load(io.BytesIO(artifacts.read_bytes(artifacts.join(scratch,
                                                                        info.base_name)))) as z:
                yield z["rows"], z["vectors"]


def assemble_embeddings(scratch: str, count: int, path: Path) -> tuple[int, np.ndarray]:
    """Copy every block of ``scratch`` to its rows of the float32 ``[count, dim]`` file ``path``
    (created); returns ``(dim, filled)``, ``filled[i]`` True where row ``i`` got a vector (an
    image whose every caption row failed to decode has none). dim 0: no block at all."""
    dim = 0
    filled = np.zeros(count, dtype=bool)
    for rows, vectors in _blocks(scratch):
        if dim == 0:
            dim = vectors.shape[1]
            with open(path, "wb") as f:
                f.truncate(count * dim * 4)
        elif vectors.shape[1] != dim:
            raise ValueError(f"embedding blocks in {scratch} disagree on the dimension "
                             f"({dim} and {vectors.shape[1]}); delete the folder and rebuild")
        table = np.memmap(path, dtype=np.float32, mode="r+", shape=(count, dim))
        table[rows] = vectors
        table.flush()
        del table  # unmapped: the written pages are the page cache's, not the driver's
        filled[rows] = True
    return dim, filled


def read_rows(path: Path, dim: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a float32 ``[N, dim]`` file, read (not mapped) into memory."""
    return np.fromfile(path, dtype=np.float32, count=(stop - start) * dim,
                       offset=start * dim * 4).reshape(-1, dim)


def build_index_from_file(path: Path, dim: int, filled: np.ndarray, cfg: Any,
                          chunk: int = ADD_CHUNK) -> Any:
    """The FAISS index of ``cfg`` (an ``IndexConfig``) over the filled rows of ``path``, in row
    order: IVF's k-means trains on an evenly spaced sample of at most 256 points per cell (what
    FAISS itself subsamples to), and vectors are added ``chunk`` rows at a time."""
    from raycmr.index.faiss_index import _as_float32, new_index

    rows = np.flatnonzero(filled)
    index = new_index(cfg.kind, dim, len(rows), nlist=cfg.nlist, nprobe=cfg.nprobe,
                      hnsw_m=cfg.hnsw_m, ef_search=cfg.ef_search)
    if not index.is_trained:
        cells = index.nlist
        count = min(len(rows), 256 * cells)
        sample = rows[np.arange(count) * len(rows) // count]  # evenly spaced, sorted, distinct
        table = np.memmap(path, dtype=np.float32, mode="r", shape=(len(filled), dim))
        index.train(_as_float32(table[sample], "embeddings"))
        del table
    for start in range(0, len(filled), chunk):
        stop = min(start + chunk, len(filled))
        block = read_rows(path, dim, start, stop)[filled[start:stop]]
        if len(block):
            index.add(_as_float32(block, "embeddings"))
    return index
