"""The token ids of a split's captions, read on the driver without decoding images (the slow
model's output vocabulary is built from them)."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow.parquet as pq

from raycmr.config import DataConfig
from raycmr.data.paths import ShardReadError, open_tar, resolve_paths, split_uri
from raycmr.data.text import load_text_encoder


def read_captions(paths: list[str] | str, max_rows: int = 0) -> list[str]:
    """The captions of the shards at ``paths`` (Parquet ``caption`` column, WebDataset
    ``.txt`` members), at most ``max_rows`` of them (0 = all)."""
    captions: list[str] = []
    for file in resolve_paths(paths):
        fs, inner, _ = split_uri(file)
        try:
            if file.lower().endswith(".tar"):
                with open_tar(fs, inner) as tar:
                    for member in tar:
                        if member.name.endswith(".txt"):
                            data = tar.extractfile(member)
                            if data is not None:
                                captions.append(data.read().decode("utf-8", errors="replace"))
            else:
                table = pq.ParquetFile(inner, filesystem=fs).read(columns=["caption"])
                captions += [c for c in table.column("caption").to_pylist() if isinstance(c, str)]
        except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
            raise ShardReadError(f"captions of shard file '{file}' cannot be read ({exc})") \
                from None
        if max_rows and len(captions) >= max_rows:
            return captions[:max_rows]
    return captions


def caption_tokens(paths: list[str] | str, cfg: DataConfig,
                   max_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of the captions at ``paths``, as training tokenizes."""
    captions = read_captions(paths, max_rows)
    return load_text_encoder(cfg.tokenizer)(captions, cfg.max_text_len)
