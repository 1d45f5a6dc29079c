"""A gallery index: embed a split's images with Ray Data batch inference, write a FAISS index,
and with a slow checkpoint the slow model's ``phi(x)`` of every image next to it.

The gallery is every unique image (``group``) of the shards: captions that share an
``image_id`` are one entry. Images are embedded by the checkpoint's image tower on Ray Data actors,
which write the embeddings to files the driver adds to FAISS chunk by chunk
(:mod:`raycmr.index.gallery_store`: the driver never holds the gallery's embeddings beyond the
index itself). The index directory holds:

    index.faiss, ids.parquet, meta.json   the FAISS index and its id table (row -> id string;
                                          the shard ``image_id``, else the row ``id``), written
                                          by :func:`raycmr.index.faiss_index.save_index`
    gallery.json                          checkpoint, shards, count, embedding dim, and the slow
                                          checkpoint of the phi store (if any)
    phi/                                  with ``slow``: phi(x) of index row i, float16, written
                                          by Ray Data actors (:mod:`raycmr.index.phi_store`)

Images are ordered by id, so a rebuild gives the same rows whatever order Ray Data returns
batches in.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raycmr import artifacts
from raycmr.config import Config, ConfigError
from raycmr.index.gallery_store import (
    EmbeddingBlockWriter,
    GalleryRows,
    assemble_embeddings,
    build_index_from_file,
    scan_gallery_rows,
)

SCRATCH_DIR = "_embedding_blocks"  # the actors' blocks while the index is built; then removed


def resolve_split(cfg: Config, split: str | list[str]) -> list[str]:
    """``"train"``/``"val"``/``"test"`` -> the config's shards for that split; anything else is paths
    (a list, or one string with comma-separated paths)."""
    if isinstance(split, str) and split in ("test", "val", "train"):
        paths = getattr(cfg.data, split)
        if not paths:
            raise ConfigError(f"the checkpoint's config has no data.{split} shards: pass "
                              f"--split PATH[,PATH...] or the override data.{split}=[PATH]")
        return list(paths)
    paths = [p for p in split.split(",") if p] if isinstance(split, str) else list(split)
    if not paths:
        raise ConfigError("--split is empty: give test, val or shard paths")
    return paths


@dataclass
class GalleryJob:
    """What one index build reads: the fast model, its config, the gallery shards and the
    optional slow model."""

    checkpoint: str
    model: Any
    cfg: Config
    paths: list[str]
    files: list[str]
    fmt: str
    slow: str | None = None
    slow_model: Any = None
    slow_cfg: Config | None = None


@dataclass
class BuiltIndex:
    index: Any
    kind: str
    dim: int
    filled: np.ndarray  # bool per gallery row: embedded (a valid row)
    pairs: int
    meta: dict[str, Any] = field(default_factory=dict)


def build_gallery_index(
    checkpoint: str,
    split: str | list[str],
    out: str | Path,
    *,
    kind: str | None = None,
    target_recall: float = 0.95,
    overrides: list[str] | None = None,
    slow: str | None = None,
    num_actors: int = 2,
    batch_size: int = 256,
    console: Any = None,
) -> dict[str, Any]:
    """Embed the gallery images of ``split`` with ``checkpoint`` and write an index dir ``out``;
    with ``slow`` (a slow-model checkpoint) also its phi(x) store (image galleries only).

    ``kind`` (flat/ivf/hnsw) defaults to the checkpoint config's ``index.kind``; IVF/HNSW
    parameters come from ``index.*`` (dotted ``overrides`` apply to the checkpoint's config).
    ``kind="auto"`` measures instead (:mod:`raycmr.index.autotune`): the fastest kind and search
    setting whose recall@10 reaches ``target_recall``; meta.json records what was measured.
    Returns the ``gallery.json`` record. Needs Ray (a local cluster is started if none).
    ``console`` (a rich Console): progress lines and a rows/s bar go there (else plain prints).
    """
    from raycmr.index.faiss_index import save_index
    from raycmr.runtime import init_ray

    job = _open_job(checkpoint, split, kind, target_recall, overrides, slow)
    say, t0 = _printer(console), time.perf_counter()
    say(f"index: scanning ids in {len(job.files)} shard file(s)")
    rows = _scan_rows(job)
    init_ray(min_cpus=num_actors + 1)
    say(f"index: embedding {len(rows)} images with {num_actors} Ray Data actors")
    built = _embed_and_build(job, rows, out, kind == "auto", target_recall, num_actors,
                             batch_size, console, say)
    names = rows.names if built.filled.all() else rows.names.filter(pa.array(built.filled))
    out = save_index(built.index, names, out, extra_meta=built.meta)
    record = _gallery_record(job, len(names), built)
    say(f"index: {len(names)} images ({built.pairs} pairs) -> {out} "
        f"[{built.kind}, dim {built.dim}] in {time.perf_counter() - t0:.1f} s")
    if job.slow_model is not None:
        record["slow_checkpoint"] = job.slow
        record["phi"] = _write_phi(job.paths, job.slow, job.slow_model, job.slow_cfg,
                                   rows.groups[built.filled], out, num_actors, batch_size, say,
                                   console)
    artifacts.write_gallery(out, record)
    return record


def _printer(console: Any):
    def say(line: str) -> None:
        if console is not None:
            console.print(line, markup=False)  # "[flat, dim 128]" is text, not rich markup
        else:
            print(line, flush=True)

    return say


def _open_job(checkpoint: str, split: str | list[str], kind: str | None, target_recall: float,
              overrides: list[str] | None, slow: str | None) -> GalleryJob:
    """Load the checkpoint (and the slow one), apply the overrides, check the shards."""
    from raycmr.config import apply_overrides
    from raycmr.data.schema import check_shards

    ckpt_dir = artifacts.find_checkpoint(checkpoint)
    model, cfg = artifacts.load_exported(ckpt_dir)
    auto = kind == "auto"
    if auto and not 0.0 < target_recall <= 1.0:
        raise ConfigError(f"--target-recall must be in (0, 1], got {target_recall}")
    cfg = apply_overrides(cfg, list(overrides or []) +
                          ([f"index.kind={kind}"] if kind and not auto else []))
    paths = resolve_split(cfg, split)
    info = check_shards(paths, cfg.data.kind, cfg.data.format)
    job = GalleryJob(ckpt_dir, model, cfg, paths, info.files, info.format)
    if slow:
        job.slow, job.slow_model, job.slow_cfg = _load_slow(slow, cfg)
    return job


def _scan_rows(job: GalleryJob) -> GalleryRows:
    rows = scan_gallery_rows(job.files, job.fmt)
    if len(rows) == 0:
        raise ConfigError(f"no rows in the gallery shards {job.paths}; nothing to index")
    return rows


def _embed_and_build(job: GalleryJob, rows: GalleryRows, out: str | Path, auto: bool,
                     target_recall: float, num_actors: int, batch_size: int, console,
                     say) -> BuiltIndex:
    """Embed into a local float32 table (through the actors' scratch blocks), then build the
    FAISS index from it: ``index.kind``'s, or with ``auto`` the measured choice."""
    scratch = artifacts.join(out, SCRATCH_DIR)
    fs, root = artifacts.split(scratch)
    fs.delete_dir_contents(root, missing_dir_ok=True)  # blocks of an interrupted build
    with tempfile.TemporaryDirectory(prefix="raycmr-index-") as tmp:
        table = Path(tmp) / "embeddings.f32"
        try:
            pairs = _embed_to_blocks(job.paths, job.cfg, job.model, rows, scratch, num_actors,
                                     batch_size, console)
            dim, filled = assemble_embeddings(scratch, len(rows), table)
        finally:  # the blocks are in the table file now (or the build failed)
            if fs.get_file_info(root).type != pafs.FileType.NotFound:
                fs.delete_dir(root)
        if not filled.any():
            raise ConfigError(f"no valid rows in the gallery shards {job.paths}; nothing to "
                              "index")
        if not auto:
            index = build_index_from_file(table, dim, filled, job.cfg.index)
            return BuiltIndex(index, job.cfg.index.kind, dim, filled, pairs)
        from raycmr.index.autotune import choose_index

        say(f"index: measuring flat, HNSW and IVF settings for recall@10 >= {target_recall}")
        vectors = np.memmap(table, dtype=np.float32, mode="r", shape=(len(rows), dim))
        index, choice = choose_index(vectors if filled.all() else vectors[filled],
                                     target_recall, hnsw_m=job.cfg.index.hnsw_m)
        del vectors
        say(f"index: chose {choice.summary()}")
        return BuiltIndex(index, choice.kind, dim, filled, pairs, {"auto": choice.meta()})


def _gallery_record(job: GalleryJob, count: int, built: BuiltIndex) -> dict[str, Any]:
    """``gallery.json``: what the index was built from."""
    ckpt = job.checkpoint
    return {
        "checkpoint": ckpt if artifacts.is_remote(ckpt) else str(Path(ckpt).resolve()),
        "shards": [str(p) for p in job.paths],
        "data_kind": job.cfg.data.kind,
        "count": count,
        "pairs": built.pairs,
        "embed_dim": built.dim,
        "index_kind": built.kind,
    }


def _embed_to_blocks(paths: list[str], cfg: Config, model, rows: GalleryRows, scratch: str,
                     num_actors: int, batch_size: int, console) -> int:
    """Embed the gallery's images on Ray Data actors that write their blocks to ``scratch``
    (:class:`~raycmr.index.gallery_store.EmbeddingBlockWriter`); returns the pairs read."""
    import ray

    from raycmr.data.inference import run_batch_inference
    from raycmr.data.pipeline import build_dataset
    from raycmr.evaluate.embedding import DualEncoderEmbedder

    bar, done = None, [0]
    if console is not None:
        from raycmr.data.pipeline import count_rows
        from raycmr.reporting.bars import RowsBar

        bar = RowsBar("index: embedding", total=count_rows(paths), console=console)

    def on_rows(n: int) -> None:
        done[0] += n
        bar.update(done[0])

    embedder = DualEncoderEmbedder(cfg.to_dict(), ray.put(model.state_dict()), images_only=True)
    writer = EmbeddingBlockWriter(embedder, ray.put(rows.lookup), scratch)
    ds = build_dataset(paths, cfg.data, training=False)
    try:
        got = run_batch_inference(ds, writer, ("pairs", "images"), num_actors=num_actors,
                                  batch_size=batch_size, on_rows=on_rows if bar else None,
                                  count_column="pairs")
    finally:
        if bar is not None:
            bar.close()
    return int(got["pairs"].sum())


def _load_slow(slow: str, cfg: Config):
    """``(resolved checkpoint, slow model, its config)``, checked against the fast config."""
    if cfg.data.kind != "images":
        raise ConfigError("--slow needs an image gallery: the slow model reads pixels, and "
                          f"this checkpoint's gallery is data.kind={cfg.data.kind}")
    slow = artifacts.find_checkpoint(slow)
    model, slow_cfg = artifacts.load_slow_exported(slow)
    if (slow_cfg.data.image_size, slow_cfg.data.tokenizer) != \
            (cfg.data.image_size, cfg.data.tokenizer):
        raise ConfigError(f"the slow checkpoint '{slow}' reads {slow_cfg.data.image_size}-px "
                          f"images / tokenizer {slow_cfg.data.tokenizer}, the fast one "
                          f"{cfg.data.image_size}-px / {cfg.data.tokenizer}: train both on the "
                          "same data config")
    if not artifacts.is_remote(slow):
        slow = str(Path(slow).resolve())
    return slow, model, slow_cfg


def _write_phi(paths: list[str], slow: str, model, slow_cfg: Config, groups: np.ndarray,
               out: str, num_actors: int, batch_size: int, say, console) -> dict[str, Any]:
    """phi(x) of every index row (``groups[i]``: row i's image) by Ray Data actors."""
    from raycmr.data.pipeline import build_dataset
    from raycmr.index.phi_store import describe_size, write_phi

    t0 = time.perf_counter()
    say(f"index: phi(x) of {len(groups)} images with the slow model ({num_actors} Ray Data "
        "actors)")
    bar, done = None, [0]
    if console is not None:
        from raycmr.reporting.bars import RowsBar

        bar = RowsBar("index: phi(x)", total=len(groups), console=console)

    def on_rows(n: int) -> None:
        done[0] += n
        bar.update(min(done[0], len(groups)))

    ds = build_dataset(paths, slow_cfg.data, training=False)
    row_of = {int(g): i for i, g in enumerate(groups.tolist())}
    try:
        record = write_phi(ds, slow_cfg, model.state_dict(), row_of, out, checkpoint=slow,
                           num_actors=num_actors, batch_size=batch_size,
                           on_rows=on_rows if bar else None)
    finally:
        if bar is not None:
            bar.close()
    say(f"index: phi store {describe_size(record)} -> {out}/phi in "
        f"{time.perf_counter() - t0:.1f} s")
    return {k: record[k] for k in ("count", "tokens", "width", "dtype", "bytes")}
