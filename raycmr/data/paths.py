"""Resolving shard path arguments (files, directories, globs; local or s3:// gs://) to files."""

from __future__ import annotations

import contextlib
import fnmatch
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

PARQUET_EXTENSIONS = (".parquet", ".pq")
TAR_EXTENSIONS = (".tar",)
SHARD_EXTENSIONS = PARQUET_EXTENSIONS + TAR_EXTENSIONS
_GLOB_CHARS = "*?["


class ShardReadError(ValueError):
    """A shard path that does not exist or a file that cannot be read; the message names it."""


def split_uri(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """``(filesystem, path inside it, scheme prefix)`` for a local path or a ``scheme://`` URI."""
    if "://" in uri:
        scheme = uri.split("://", 1)[0] + "://"
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
            raise ShardReadError(f"cannot open filesystem for '{uri}': {exc}") from None
        return fs, path, "" if scheme == "file://" else scheme
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute()), ""


def _is_shard_name(path: str, extensions: tuple[str, ...]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith((".", "_")) and name.lower().endswith(extensions)


def _list_dir(fs: pafs.FileSystem, path: str, extensions: tuple[str, ...]) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and _is_shard_name(i.path, extensions)
    )


def _expand_glob(fs: pafs.FileSystem, pattern: str, extensions: tuple[str, ...]) -> list[str]:
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    base = "/".join(fixed) or "/"
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and fnmatch.fnmatchcase(i.path, pattern)
        and not i.base_name.startswith((".", "_"))
    )


def resolve_paths(
    paths: list[str] | str, extensions: tuple[str, ...] = SHARD_EXTENSIONS
) -> list[str]:
    """Expand files, directories (recursively, files ending in ``extensions``) and globs.

    Returns sorted, de-duplicated file paths (URIs keep their scheme). Raises
    :class:`ShardReadError` naming any argument that matches nothing.
    """
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ShardReadError("no shard paths given: set data.train / data.val / data.test")
    out: list[str] = []
    for arg in paths:
        fs, path, prefix = split_uri(str(arg))
        if any(c in path for c in _GLOB_CHARS):
            found = _expand_glob(fs, path, extensions)
            if not found:
                raise ShardReadError(f"shard glob '{arg}' matches no files")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise ShardReadError(f"shard path '{arg}' does not exist")
            if info.type == pafs.FileType.Directory:
                found = _list_dir(fs, path, extensions)
                if not found:
                    raise ShardReadError(
                        f"shard directory '{arg}' holds no shard files "
                        f"(looked for {', '.join('*' + e for e in extensions)})"
                    )
            else:
                found = [path]
        out.extend(prefix + f for f in found)
    return list(dict.fromkeys(out))


def detect_format(files: list[str], fmt: str = "auto") -> str:
    """``"parquet"`` or ``"webdataset"``: ``fmt`` itself, or chosen from the file extensions."""
    if fmt in ("parquet", "webdataset"):
        return fmt
    if fmt != "auto":
        raise ShardReadError(f"data.format is '{fmt}'; choose auto, parquet or webdataset")
    tars = [f for f in files if f.lower().endswith(TAR_EXTENSIONS)]
    if tars and len(tars) != len(files):
        raise ShardReadError(
            f"shards mix .tar and other files (e.g. '{tars[0]}' and "
            f"'{next(f for f in files if f not in tars)}'); give one format per split"
        )
    return "webdataset" if tars else "parquet"


#: Config keys holding shard or checkpoint locations.
PATH_KEYS = ("data.train", "data.val", "data.test", "dckt.source", "dckt.target",
             "train.resume_from", "loss.distill.feature_teacher", "loss.distill.slow")


def _absolute(path: str) -> str:
    return path if not path or "://" in path else str(Path(path).expanduser().absolute())


def with_absolute_paths(cfg):
    """``cfg`` with every relative local path of :data:`PATH_KEYS` made absolute (URIs kept).

    Needed before handing a config to processes whose working directory differs from the
    driver's: Ray Tune runs each trial in its own trial directory."""
    from raycmr.config import with_overrides

    changes = {}
    for key in PATH_KEYS:
        value = cfg.get(key)
        new = [_absolute(p) for p in value] if isinstance(value, list) else _absolute(value)
        if new != value:
            changes[key] = new
    return with_overrides(cfg, changes) if changes else cfg


@contextlib.contextmanager
def open_tar(fs: pafs.FileSystem, inner: str) -> Iterator[tarfile.TarFile]:
    """A WebDataset tar shard on ``fs`` opened for one streaming pass over its members."""
    with fs.open_input_stream(inner) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        yield tar
