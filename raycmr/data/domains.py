"""Two-domain data for DCKT transfer: source/target datasets, pair keys, distributed scoring.

DCKT (Huang & Peng, CVPR 2018, "Deep Cross-media Knowledge Transfer") trains on a large source
domain and a small target domain. A domain is either its own shards (``dckt.source`` /
``dckt.target``) or the rows of ``data.train`` whose ``domain`` column is ``"source"`` /
``"target"``. Every pair is identified by ``pair_key = stable_hash63(id)``, so that the pairs a
progressive-transfer round selects can be kept by a Ray Data filter, whatever order Ray Data
reads them in.

- :func:`domain_specs`: the two domains of a config, checked on the driver;
- :func:`read_domain_columns`: small columns (``id``, ``label``) of one domain, on the driver;
- :func:`build_domain_dataset`: the lazy preprocessed dataset of one domain (optionally only
  the pairs whose key is in ``keys``), with a ``pair_key`` column;

A domain's pairs are embedded for selection by :func:`raycmr.evaluate.embedding.embed_pairs`
(the batch-inference path of evaluation and the index).

Driver-side column reads need Parquet shards (WebDataset tars are rejected with a clear
message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycmr import compat
from raycmr.config import Config, ConfigError, DataConfig
from raycmr.data.paths import split_uri
from raycmr.data.pipeline import feature_dims, read_parquet
from raycmr.data.schema import check_shards
from raycmr.data.text import load_text_encoder
from raycmr.data.transforms import preprocess_features, preprocess_images, stable_hash63

SOURCE, TARGET = "source", "target"
_MAP_BATCH_ROWS = {"features": 1024, "images": 128}


@dataclass(frozen=True)
class DomainSpec:
    """One domain: its shard paths and the ``domain`` column value to keep (None: all rows)."""

    name: str
    paths: tuple[str, ...]
    domain: str | None = None

    def describe(self) -> str:
        where = ", ".join(self.paths)
        return f"{where} (domain == '{self.domain}')" if self.domain else where


def pair_keys(ids: Any) -> np.ndarray:
    """``stable_hash63(str(id))`` of every id, int64: the identity of a pair across rounds."""
    return np.array([stable_hash63(str(i)) for i in ids], dtype=np.int64)


def _files(spec: DomainSpec, data: DataConfig) -> list[str]:
    info = check_shards(list(spec.paths), data.kind, data.format)
    if info.format != "parquet":
        raise ConfigError(
            f"DCKT {spec.name} shards {spec.describe()} are WebDataset tars; DCKT reads the "
            "id/label/domain columns on the driver and needs Parquet shards"
        )
    if spec.domain is not None and "domain" not in info.columns:
        raise ConfigError(
            f"DCKT: {spec.describe()} has no 'domain' column; write it (values 'source' and "
            "'target') or give two shard sets with dckt.source=[...] dckt.target=[...]"
        )
    return info.files


def domain_specs(cfg: Config) -> tuple[DomainSpec, DomainSpec]:
    """``(source, target)`` from ``dckt.source``/``dckt.target``, else from ``data.train``'s
    ``domain`` column. Raises :class:`ConfigError` when neither is usable."""
    d = cfg.dckt
    if bool(d.source) != bool(d.target):
        raise ConfigError("DCKT needs both dckt.source and dckt.target shards, or neither (then "
                          "data.train's 'domain' column names each row's domain)")
    if d.source:
        return (DomainSpec(SOURCE, tuple(d.source)), DomainSpec(TARGET, tuple(d.target)))
    if not cfg.data.train:
        raise ConfigError("DCKT needs data: set dckt.source=[...] and dckt.target=[...], or "
                          "data.train=[...] with a 'domain' column ('source' / 'target')")
    return (DomainSpec(SOURCE, tuple(cfg.data.train), SOURCE),
            DomainSpec(TARGET, tuple(cfg.data.train), TARGET))


def read_domain_columns(spec: DomainSpec, data: DataConfig,
                        columns: tuple[str, ...] = ("id", "label")) -> dict[str, np.ndarray]:
    """The given small columns of every row of one domain (driver side, Parquet column reads).
    ``label`` nulls (and a missing ``label`` column) read as -1."""
    tables = []
    for file in _files(spec, data):
        fs, inner, _ = split_uri(file)
        names = pq.read_schema(inner, filesystem=fs).names
        wanted = [c for c in columns if c in names]
        if spec.domain is not None:
            wanted = list(dict.fromkeys(wanted + ["domain"]))
        table = pq.read_table(inner, filesystem=fs, columns=wanted)
        if spec.domain is not None:
            table = table.filter(pc.fill_null(pc.equal(table["domain"], spec.domain), False))
        tables.append(table)
    out: dict[str, np.ndarray] = {}
    for col in columns:
        parts = []
        for table in tables:
            if col in table.column_names:
                arr = table[col]
                if col == "label":
                    arr = pc.fill_null(pc.cast(arr, pa.int64()), -1)
                parts.append(arr.to_numpy(zero_copy_only=False))
            elif col == "label":
                parts.append(np.full(table.num_rows, -1, dtype=np.int64))
            else:
                raise ConfigError(f"DCKT {spec.name} shards {spec.describe()} lack column '{col}'")
        out[col] = np.concatenate(parts) if parts else np.zeros(0)
    return out


def _prepare(table: pa.Table, *, kind: str, domain: str | None, keys: np.ndarray | None,
             image_dim: int, text_dim: int, data: DataConfig, training: bool,
             seed: int) -> dict[str, np.ndarray]:
    """One Arrow batch -> the domain's rows (and selected pairs), preprocessed, + ``pair_key``."""
    if domain is not None:
        table = table.filter(pc.fill_null(pc.equal(table["domain"], domain), False))
    key = pair_keys(table.column("id").to_pylist())
    if keys is not None:
        keep = np.isin(key, keys)
        table, key = table.filter(pa.array(keep)), key[keep]
    if kind == "features":
        out = preprocess_features(table, image_dim=image_dim, text_dim=text_dim)
    else:
        epoch = compat.data_epoch()
        out = preprocess_images(table, image_size=data.image_size, max_text_len=data.max_text_len,
                                encode=load_text_encoder(data.tokenizer),
                                augment=training and data.augment, seed=seed, epoch=epoch)
    out["pair_key"] = key
    return out


def build_domain_dataset(spec: DomainSpec, data: DataConfig, *, training: bool, seed: int = 0,
                         keys: np.ndarray | None = None):
    """A lazy ``ray.data.Dataset`` of one domain's preprocessed rows (the columns of
    :func:`raycmr.data.pipeline.build_dataset` + ``pair_key``); with ``keys``, only the pairs
    whose ``pair_key`` is in it. Training reads files in a seeded order."""
    from ray.data import FileShuffleConfig

    files = _files(spec, data)
    image_dim = text_dim = 0
    if data.kind == "features":
        image_dim, text_dim = feature_dims(files)
    else:
        load_text_encoder(data.tokenizer)  # fail on the driver, not inside a Ray task
    ds = read_parquet(files, reader=data.parquet_reader,
                      shuffle=FileShuffleConfig(seed=seed) if training else None)
    fn_kwargs = {"kind": data.kind, "domain": spec.domain,
                 "keys": None if keys is None else np.asarray(keys, dtype=np.int64),
                 "image_dim": image_dim, "text_dim": text_dim, "data": data,
                 "training": training, "seed": seed}
    return ds.map_batches(_prepare, fn_kwargs=fn_kwargs, batch_format="pyarrow",
                          batch_size=_MAP_BATCH_ROWS[data.kind],
                          num_cpus=data.num_cpus_per_map_task)
