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
from raycmr.config import ConfigError, DataConfig
from raycmr.data.paths import ShardReadError, open_tar, resolve_paths, split_uri
from raycmr.data.schema import WDS_KEY_EXT, ShardInfo, check_shards
from raycmr.data.text import TokenizerError, load_text_encoder, load_tokenizer
from raycmr.data.transforms import preprocess_features, preprocess_images

__all__ = [
    "TokenizerError", "build_dataset", "count_groups", "count_rows", "feature_dims",
    "iter_worker_batches", "load_tokenizer", "pack_group",
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


def pack_group(columns: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """One group's preprocessed rows as one row: each numeric column [n, ...] becomes
    [1, size, ...] (zero padded), ``member_valid`` [1, size] says which members are real and
    valid, ``valid`` whether any is, ``drop_reason`` the dropped members' reasons joined by ';';
    string columns keep the first member's value."""
    n = len(columns["valid"])
    if n > size:
        raise ValueError(f"a shard group has {n} rows, more than data.group_size={size}")
    members = np.zeros((1, size), dtype=bool)
    members[0, :n] = columns["valid"]
    out = {"member_valid": members, "valid": members.any(axis=1),
           "drop_reason": np.array([";".join(r for r in columns["drop_reason"] if r)],
                                   dtype=object)}
    for name, value in columns.items():
        if name in out:
            continue
        if value.dtype == object:
            out[name] = value[:1]
        else:
            out[name] = np.zeros((1, size, *value.shape[1:]), dtype=value.dtype)
            out[name][0, :n] = value
    return out


def _group_fn(table, *, cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    return pack_group(_images_fn(table, cfg=cfg, training=True, seed=seed), cfg.group_size)


def count_groups(paths: list[str] | str, size: int) -> int:
    """Distinct values of the shards' ``group`` column (Parquet only), checking that each
    group has at most ``size`` rows (``data.group_size``) and no row lacks a group."""
    counts: collections.Counter[str] = collections.Counter()
    fix = ("write the training shards with `raycmr shards synthetic --hard-images` or set "
           "data.group_size=0")
    for file in resolve_paths(paths):
        fs, inner, _ = split_uri(file)
        if file.lower().endswith(".tar") or "group" not in pq.read_schema(inner, filesystem=fs).names:
            raise ConfigError(f"data.group_size={size} keeps the rows of one shard group in one "
                              f"batch, but '{file}' has no group column: {fix}")
        groups = pq.read_table(inner, columns=["group"], filesystem=fs).column("group")
        if groups.null_count:
            raise ConfigError(f"data.group_size={size}: '{file}' has rows without a group: {fix}")
        counts.update(groups.to_pylist())
    largest = max(counts.values(), default=0)
    if largest > size:
        raise ConfigError(f"data.group_size is {size} but a training group has {largest} rows: "
                          f"set data.group_size >= {largest}")
    return len(counts)


def build_dataset(paths: list[str] | str, cfg: DataConfig, *, training: bool, seed: int = 0):
    """A lazy ``ray.data.Dataset`` of preprocessed rows for the shards at ``paths``.

    Checks the shards on the driver first (:class:`~raycmr.data.schema.ShardSchemaError`,
    :class:`~raycmr.data.paths.ShardReadError`), and the tokenizer (:class:`TokenizerError`).
    Training reads files in a seeded order that changes every epoch. Columns: see
    :func:`~raycmr.data.transforms.preprocess_images` / ``preprocess_features``. Training with
    ``data.group_size`` > 0: one row per shard ``group`` (Ray Data's ``groupby().map_groups``,
    :func:`pack_group`), unpacked into its members by :func:`iter_worker_batches`.
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
    if training and cfg.group_size > 0:
        return ds.groupby("group").map_groups(
            _group_fn, fn_kwargs={"cfg": cfg, "seed": seed}, batch_format="pyarrow",
            num_cpus=cfg.num_cpus_per_map_task)
    return ds.map_batches(
        _images_fn, fn_kwargs={"cfg": cfg, "training": training, "seed": seed},
        batch_format="pyarrow", batch_size=_map_batch_rows(cfg.image_size),
        num_cpus=cfg.num_cpus_per_map_task,
    )


def _tensor_batch(batch: dict[str, np.ndarray], keep: np.ndarray,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The tensor columns of rows ``keep`` (and ``extra`` columns as arrays, unpacked rows only);
    packed groups (:func:`pack_group`) are unpacked into their valid members, a group's
    members next to each other."""
    import torch

    members = batch.get("member_valid")
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if name in TENSOR_COLUMNS:
            value = value[keep] if members is None else value[keep][members[keep]]
            out[name] = torch.from_numpy(np.ascontiguousarray(value))
    out.update({k: np.asarray(batch[k])[keep] for k in extra})
    return out


def _dropped(batch: dict[str, np.ndarray], valid: np.ndarray) -> collections.Counter[str]:
    """Dropped rows by reason; for packed groups every dropped member (';'-joined reasons)."""
    reasons = np.asarray(batch["drop_reason"])
    if "member_valid" in batch:
        return collections.Counter(r for joined in reasons for r in str(joined).split(";") if r)
    return collections.Counter(str(r) for r in reasons[~valid])


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
        dropped = _dropped(batch, valid)
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
