"""The Ray Data pipeline: lazy shard reading, CPU preprocessing tasks, per-worker batches.

``build_dataset`` checks the shards on the driver, then returns a lazy ``ray.data.Dataset``
(nothing is read until a worker iterates it). ``iter_worker_batches`` turns a worker's
``DataIterator`` into torch batches of valid rows plus counts of dropped rows by reason.
"""

from __future__ import annotations

import collections
import tarfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raycmr import compat
from raycmr.config import DataConfig
from raycmr.data.paths import ShardReadError, open_tar, resolve_paths, split_uri
from raycmr.data.schema import WDS_KEY_EXT, ShardInfo, check_shards
from raycmr.data.text import TokenizerError, load_text_encoder, load_tokenizer
from raycmr.data.transforms import preprocess_features, preprocess_images

__all__ = [
    "TokenizerError", "build_dataset", "count_rows", "feature_dims", "iter_worker_batches",
    "load_tokenizer",
]

MAP_BATCH_BYTES = 16 * 2**20  # target size of one preprocessed image batch
TENSOR_COLUMNS = ("pixel_values", "input_ids", "attention_mask", "image_feat", "text_feat",
                  "group", "label", "neg_input_ids", "neg_attention_mask", "neg_valid")


def feature_dims(files: list[str]) -> tuple[int, int]:
    """``(image_dim, text_dim)`` read from the first non-null vectors of the first shard."""
    fs, inner, _ = split_uri(files[0])
    pf = pq.ParquetFile(inner, filesystem=fs)
    for batch in pf.iter_batches(batch_size=256, columns=["image_feat", "text_feat"]):
        dims = []
        for name in ("image_feat", "text_feat"):
            lengths = [len(v) for v in batch.column(name).to_pylist() if v is not None]
            dims.append(max(set(lengths), key=lengths.count) if lengths else 0)
        if all(dims):
            return dims[0], dims[1]
    raise ShardReadError(f"shard '{files[0]}' has no non-null image_feat/text_feat vectors")


def _map_batch_rows(image_size: int) -> int:
    return int(np.clip(MAP_BATCH_BYTES // (3 * image_size * image_size * 4), 16, 512))


def read_parquet(files: list[str], *, reader: str, shuffle=None):
    """``ray.data.read_parquet`` through the read path ``reader`` names (``data.parquet_reader``).

    Ray 2.60 routes ``read_parquet`` through its V2 datasource by default, which starts with one
    ListFiles task and was 16x slower to deliver the first rows in ``benchmarks/bench_ingest.py``;
    the choice is made when ``read_parquet`` is called, so the context is set just around it.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    if reader != "ray_default":
        ctx.use_datasource_v2 = reader == "v2"
    try:
        return ray.data.read_parquet(files, shuffle=shuffle, file_extensions=None)
    finally:
        ctx.use_datasource_v2 = before


def _read(info: ShardInfo, *, training: bool, seed: int, reader: str):
    import ray.data
    from ray.data import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=seed) if training else None
    if info.format == "webdataset":
        return ray.data.read_webdataset(info.files, decoder=None, shuffle=shuffle,
                                        file_extensions=None)
    return read_parquet(info.files, reader=reader, shuffle=shuffle)


def _images_fn(table, *, cfg: DataConfig, training: bool, seed: int) -> dict[str, np.ndarray]:
    epoch = compat.data_epoch()
    hard = cfg.hard_negatives
    return preprocess_images(
        table, image_size=cfg.image_size, max_text_len=cfg.max_text_len,
        encode=load_text_encoder(cfg.tokenizer),
        augment=training and cfg.augment, seed=seed, epoch=epoch,
        hard_negatives=hard.kind if training else "none", k=hard.k,
    )


def build_dataset(paths: list[str] | str, cfg: DataConfig, *, training: bool, seed: int = 0):
    """A lazy ``ray.data.Dataset`` of preprocessed rows for the shards at ``paths``.

    Checks the shards on the driver first (:class:`~raycmr.data.schema.ShardSchemaError`,
    :class:`~raycmr.data.paths.ShardReadError`), and the tokenizer (:class:`TokenizerError`).
    Training reads files in a seeded order that changes every epoch. Columns: see
    :func:`~raycmr.data.transforms.preprocess_images` / ``preprocess_features``.
    """
    info = check_shards(paths, cfg.kind, cfg.format)
    ds = _read(info, training=training, seed=seed, reader=cfg.parquet_reader)
    if cfg.kind == "features":
        image_dim, text_dim = feature_dims(info.files)
        return ds.map_batches(
            preprocess_features, fn_kwargs={"image_dim": image_dim, "text_dim": text_dim},
            batch_format="pyarrow", batch_size=1024, num_cpus=cfg.num_cpus_per_map_task,
        )
    load_text_encoder(cfg.tokenizer)  # fail on the driver, not inside a Ray task
    return ds.map_batches(
        _images_fn, fn_kwargs={"cfg": cfg, "training": training, "seed": seed},
        batch_format="pyarrow", batch_size=_map_batch_rows(cfg.image_size),
        num_cpus=cfg.num_cpus_per_map_task,
    )


def _tensor_batch(batch: dict[str, np.ndarray], keep: np.ndarray,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(v[keep]))
                           for k, v in batch.items() if k in TENSOR_COLUMNS}
    out.update({k: np.asarray(batch[k])[keep] for k in extra})
    return out


def iter_worker_batches(
    data_iterator: Any,
    batch_size: int,
    *,
    shuffle_buffer: int,
    seed: int,
    drop_last: bool,
    prefetch_batches: int = 1,
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[dict[str, Any], collections.Counter[str]]]:
    """Yield ``(batch, dropped)``: torch tensors of the valid rows, and invalid rows by reason.

    ``data_iterator`` is a ``DataIterator`` (``ray.train.get_dataset_shard``) or a ``Dataset``.
    Batches hold the tensor columns (and the columns named in ``extra``, e.g. ``pair_swap``,
    as numpy arrays of the valid rows); after dropping invalid rows a batch may
    be smaller than ``batch_size``; no batch is empty. Counts of a batch whose rows were all
    invalid are added to a neighbouring yielded batch, so that summing ``dropped`` over the
    whole iteration is exact (unless no row at all is valid: then a warning names the counts).
    """
    batches = data_iterator.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer if shuffle_buffer > 0 else None,
        local_shuffle_seed=seed if shuffle_buffer > 0 else None,
    )
    held: tuple[dict[str, Any], collections.Counter[str]] | None = None
    pending: collections.Counter[str] = collections.Counter()
    for batch in batches:
        valid = np.asarray(batch["valid"], dtype=bool)
        dropped = collections.Counter(str(r) for r in np.asarray(batch["drop_reason"])[~valid])
        if not valid.any():
            if held is not None:
                held[1].update(dropped)
            else:
                pending.update(dropped)
            continue
        if held is not None:
            yield held
        dropped.update(pending)
        pending = collections.Counter()
        held = (_tensor_batch(batch, valid, extra), dropped)
    if held is not None:
        yield held
    elif pending:
        warnings.warn(f"no valid rows at all; dropped {dict(pending)}", stacklevel=2)


def count_rows(paths: list[str] | str) -> int:
    """Rows in the shards at ``paths``: Parquet footers only (tars: one row per sample key)."""
    total = 0
    for file in resolve_paths(paths):
        fs, inner, _ = split_uri(file)
        try:
            if file.lower().endswith(".tar"):
                with open_tar(fs, inner) as tar:
                    keys = {m.group(1) for m in map(WDS_KEY_EXT.match, tar.getnames()) if m}
                total += len(keys)
            else:
                total += pq.ParquetFile(inner, filesystem=fs).metadata.num_rows
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise ShardReadError(
                f"shard file '{file}' cannot be read ({exc}); it may be truncated: rewrite it "
                "(raycmr shards ...) or remove it from the split") from None
    return total
