"""The slow model's image side, stored next to a gallery index: ``phi(x)`` of every image.

The slow stage (:mod:`raycmr.models.slow`, Miech et al. 2021) scores a caption against an
image's spatial tokens ``phi(x)`` ([P, width], P = (image_size / 8)^2). They depend on the
image alone, so ``raycmr index --slow SLOW`` computes them once, at index time, and the Serve
slow stage reads the candidates' tokens instead of running the CNN per query. Layout, in the
index folder (a local path or an object-store URI)::

    phi/meta.json            count, tokens, width, dtype, the block files, bytes, checkpoint
    phi/rows.npy             int64 [count, 2]: index row i -> (block number, row in that block)
    phi/block-<hex>.npy      float16 [n, tokens, width]: one per Ray Data batch

The blocks are written by Ray Data actors (:func:`write_phi`, through
:func:`raycmr.data.inference.run_batch_inference`): each actor encodes a batch of decoded
images, keeps each gallery image once per batch, writes the block itself and returns only
(index row, block, offset) per image, so neither pixels nor tokens pass through the driver.
Captions of one image are adjacent in the shards, so an image lands in two blocks only when its
captions straddle a batch boundary; ``rows.npy`` points at its first copy. Index row ``i`` is
the row of ``ids.parquet`` (the FAISS id), so ``PhiStore.get([i])`` is phi of image ``ids[i]``.

float16 halves the store; :func:`raycmr.models.slow.stored_phi` rounds tokens the same way
where they are scored offline (``raycmr eval --rerank``), so offline and served scores agree.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from raycmr import artifacts
from raycmr.config import ConfigError

PHI_DIR, PHI_META, PHI_ROWS = "phi", "meta.json", "rows.npy"
NP_DTYPE = np.dtype(np.float16)  # = raycmr.models.slow.PHI_STORE_DTYPE


def phi_dir(index_dir: str | Path) -> str:
    return artifacts.join(index_dir, PHI_DIR)


def has_phi(index_dir: str | Path) -> bool:
    """True when ``index_dir`` holds a phi store (its ``phi/meta.json``)."""
    return artifacts.exists(artifacts.join(phi_dir(index_dir), PHI_META))


def read_phi_meta(index_dir: str | Path) -> dict[str, Any]:
    """``phi/meta.json`` of an index folder."""
    return json.loads(artifacts.read_text(artifacts.join(phi_dir(index_dir), PHI_META)))


def weights_digest(checkpoint: str | Path) -> str:
    """SHA-256 of a checkpoint's ``model.pt``: which slow model a store was computed with,
    wherever the checkpoint has been copied since."""
    import hashlib

    path = artifacts.join(artifacts.find_checkpoint(checkpoint), artifacts.MODEL_FILE)
    return hashlib.sha256(artifacts.read_bytes(path)).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ writing


class PhiBlockWriter:
    """A picklable model factory for :func:`~raycmr.data.inference.run_batch_inference`: in an
    actor it builds the slow model of ``cfg_dict`` with ``state`` (a state dict or its object
    ref) and returns a function from a decoded image batch to ``row``, ``block``, ``offset``
    (one entry per gallery image it wrote to ``out/phi/block-<hex>.npy``).

    ``row_of`` maps an image's ``group`` to its index row (a dict or its object ref); rows of
    groups not in it, invalid rows and repeats within the batch are skipped."""

    def __init__(self, cfg_dict: dict[str, Any], state: Any, row_of: Any, out: str):
        self.cfg_dict, self.state, self.row_of, self.out = cfg_dict, state, row_of, str(out)

    def __call__(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        import ray
        import torch

        from raycmr.config import config_from_dict
        from raycmr.models.slow import PHI_STORE_DTYPE, build_slow_model

        cfg = config_from_dict(self.cfg_dict)
        state = ray.get(self.state) if isinstance(self.state, ray.ObjectRef) else self.state
        row_of = ray.get(self.row_of) if isinstance(self.row_of, ray.ObjectRef) else self.row_of
        model = build_slow_model(cfg.slow, state["vocab"], cfg.data.image_size,
                                 cfg.data.max_text_len)
        model.load_state_dict(state)
        model.eval()
        out = self.out

        @torch.no_grad()
        def encode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            picked: dict[int, int] = {}  # index row -> batch position (first caption row)
            for i, (ok, group) in enumerate(zip(batch["valid"], batch["group"])):
                row = row_of.get(int(group))
                if ok and row is not None and row not in picked:
                    picked[row] = i
            if not picked:
                return {"row": np.zeros(0, np.int64), "block": np.array([], dtype=object),
                        "offset": np.zeros(0, np.int64)}
            at = np.fromiter(picked.values(), np.int64)
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][at]))
            phi = model.encode_image(pixels).to(PHI_STORE_DTYPE).numpy()
            name = f"block-{uuid.uuid4().hex}.npy"
            artifacts.write_bytes(artifacts.join(phi_dir(out), name), _npy_bytes(phi))
            return {"row": np.fromiter(picked, np.int64),
                    "block": np.array([name] * len(at), dtype=object),
                    "offset": np.arange(len(at), dtype=np.int64)}

        return encode


def assemble(rows: np.ndarray, blocks: np.ndarray, offsets: np.ndarray, count: int
             ) -> tuple[list[str], np.ndarray, int]:
    """``(block names, locations [count, 2], copies)`` from what the writers returned: each
    index row's first copy; ``copies`` counts every stored row. ValueError naming the first
    rows no block holds."""
    names = sorted(set(blocks.tolist()))
    number = {n: b for b, n in enumerate(names)}
    loc = np.full((count, 2), -1, dtype=np.int64)
    order = np.lexsort((offsets, [number[b] for b in blocks]))
    for i in order[::-1]:  # the lowest (block, offset) copy is assigned last: it wins
        loc[rows[i]] = (number[blocks[i]], offsets[i])
    missing = np.flatnonzero(loc[:, 0] < 0)
    if len(missing):
        raise ValueError(f"no phi(x) was written for index rows {missing[:5].tolist()} "
                         f"({len(missing)} of {count}); rebuild the index")
    return names, loc, len(rows)


def write_phi(ds: Any, slow_cfg, slow_state: dict, row_of: dict[int, int], out: str | Path,
              *, checkpoint: str, num_actors: int = 2, batch_size: int = 64,
              on_rows: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compute and store phi(x) of every gallery image of the decoded dataset ``ds`` (read with
    the slow checkpoint's ``data`` config) into ``out/phi/``; ``row_of[group]`` is the image's
    index row. Returns the store's ``meta.json`` record (``bytes``: the block files' size)."""
    import ray

    from raycmr.data.inference import run_batch_inference

    fs, root = artifacts.split(phi_dir(out))
    fs.delete_dir_contents(root, missing_dir_ok=True)  # a rebuild leaves no stale blocks
    factory = PhiBlockWriter(slow_cfg.to_dict(), ray.put(slow_state), ray.put(row_of), str(out))
    got = run_batch_inference(ds, factory, ("row", "block", "offset"), num_actors=num_actors,
                              batch_size=batch_size, on_rows=on_rows)
    return finish_phi(out, got, len(row_of), slow_cfg, checkpoint)


def finish_phi(out: str | Path, got: dict[str, np.ndarray], count: int, slow_cfg,
               checkpoint: str) -> dict[str, Any]:
    """Write ``rows.npy`` and ``meta.json`` of the blocks the writers reported (``got``:
    their ``row``, ``block``, ``offset`` concatenated) for an index of ``count`` rows."""
    names, loc, copies = assemble(np.asarray(got["row"], np.int64), np.asarray(got["block"]),
                                  np.asarray(got["offset"], np.int64), count)
    directory = phi_dir(out)
    fs, root = artifacts.split(directory)
    sizes = [info.size for info in fs.get_file_info([root + "/" + n for n in names])]
    side = slow_cfg.data.image_size // 8
    record = {"count": count, "tokens": side * side, "width": slow_cfg.slow.width,
              "dtype": NP_DTYPE.name, "blocks": names, "copies": copies,
              "bytes": int(sum(sizes)), "checkpoint": str(checkpoint),
              "weights_sha256": weights_digest(checkpoint)}
    artifacts.write_bytes(artifacts.join(directory, PHI_ROWS), _npy_bytes(loc))
    artifacts.write_bytes(artifacts.join(directory, PHI_META),
                          json.dumps(record, indent=2).encode())
    return record


# ------------------------------------------------------------------------------------ reading


class PhiStore:
    """The phi store of an index folder, memory-mapped: ``get(rows)`` -> float16
    ``[len(rows), tokens, width]``; only the rows asked for are read from disk. A remote store
    is copied to a local temporary directory first."""

    def __init__(self, index_dir: str | Path):
        directory = phi_dir(index_dir)
        if not has_phi(index_dir):
            raise ConfigError(f"index '{index_dir}' has no phi store ({PHI_DIR}/{PHI_META}); "
                              "rebuild it with `raycmr index --checkpoint FAST --slow SLOW ...`")
        local = artifacts.local_dir(directory)
        self.meta = json.loads((local / PHI_META).read_text())
        self.loc = np.load(local / PHI_ROWS)
        self.blocks = [np.load(local / name, mmap_mode="r") for name in self.meta["blocks"]]
        shape = (self.meta["tokens"], self.meta["width"])
        bad = [n for n, b in zip(self.meta["blocks"], self.blocks)
               if b.shape[1:] != shape or b.dtype != NP_DTYPE]
        if bad or self.loc.shape != (self.meta["count"], 2):
            raise ConfigError(f"phi store '{directory}' is inconsistent (blocks {bad[:3]}, "
                              f"{len(self.loc)} row locations for {self.meta['count']} rows); "
                              "rebuild the index")

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self), int(self.meta["tokens"]), int(self.meta["width"])

    def get(self, rows) -> np.ndarray:
        """phi(x) of index rows ``rows`` (any int sequence), float16 ``[n, tokens, width]``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"index rows {rows.tolist()[:5]} outside 0..{len(self) - 1}")
        out = np.empty((len(rows), *self.shape[1:]), dtype=NP_DTYPE)
        for i, (b, o) in enumerate(self.loc[rows]):
            out[i] = self.blocks[b][o]
        return out


def describe_size(record: dict[str, Any]) -> str:
    """``"500 images x 64 x 128 float16 = 8.2 MB (16.4 KB per image)"``."""
    n, size = record["count"], record["bytes"]
    extra = record["copies"] - n
    dup = f", {extra} repeated at batch edges" if extra else ""
    return (f"{n} images x {record['tokens']} x {record['width']} {record['dtype']} = "
            f"{_mb(size)} ({size / max(n, 1) / 1024:.1f} KB per image{dup})")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"
