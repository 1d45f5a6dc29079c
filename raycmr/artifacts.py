"""What raycmr writes and reads back: checkpoint exports and index folders.

Every location is a local path or an object-store URI (``s3://``, ``gs://``, ``file://``),
opened through ``pyarrow.fs``; train, eval, ``raycmr index`` and the Serve app all read a model
through here, never through the trainer.

A checkpoint directory (one per report, written by every worker and merged by Ray Train)::

    ds/            DeepSpeed engine state (train/loop.py; only training reads it)
    model.pt       the dual encoder's full state dict, loadable without DeepSpeed (rank 0)
    config.yaml    the config the run used (rank 0)
    state.json     epoch, global step, samples seen, metrics at save time (rank 0)

An index folder (``raycmr index``)::

    index.faiss, ids.parquet, meta.json   the FAISS index (serialised bytes), its id table
                                          (``row`` int64 -> ``id`` string) and its kind, dim,
                                          count, metric and build/search parameters
    gallery.json                          checkpoint, shards, count, dims, slow checkpoint
    phi/                                  optional (``--slow``): the slow model's phi(x) of
                                          image row i (:mod:`raycmr.index.phi_store`)
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import yaml

from raycmr.config import Config, ConfigError, config_from_dict, upgrade_saved

if TYPE_CHECKING:
    import torch

    from raycmr.models.dual_encoder import DualEncoder

MODEL_FILE, CONFIG_FILE, STATE_FILE = "model.pt", "config.yaml", "state.json"
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE)
INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.parquet", "meta.json"
GALLERY_FILE = "gallery.json"
INDEX_FILES = (INDEX_FILE, IDS_FILE, META_FILE, GALLERY_FILE)


# ------------------------------------------------------------------------------------ locations


def split(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a ``scheme://`` URI."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
        raise ConfigError(f"cannot open filesystem for '{uri}': {exc}") from None


def is_remote(uri: str | Path) -> bool:
    """True for object-store URIs (anything ``scheme://`` except ``file://``)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(uri: str | Path, name: str) -> str:
    """``uri/name`` for paths and URIs alike."""
    return str(uri).rstrip("/") + "/" + name


def exists(uri: str | Path) -> bool:
    fs, path = split(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str | Path) -> bytes:
    fs, path = split(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating its parent directory."""
    fs, path = split(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def require(uri: str, files: tuple[str, ...], what: str, fix: str) -> None:
    """:class:`ConfigError` naming ``uri`` unless it exists and holds every one of ``files``."""
    if not exists(uri):
        raise ConfigError(f"{what} '{uri}' does not exist; {fix}")
    missing = [f for f in files if not exists(join(uri, f))]
    if missing:
        raise ConfigError(f"{what} '{uri}' is missing {', '.join(missing)}; {fix}")


def local_dir(uri: str | Path) -> Path:
    """A local directory holding ``uri``'s files: the path itself, or a fresh copy of a remote
    directory in a temporary directory."""
    if not is_remote(uri):
        return Path(str(uri).removeprefix("file://")).expanduser()
    fs, path = split(uri)
    dest = Path(tempfile.mkdtemp(prefix="raycmr-"))
    pafs.copy_files(path, str(dest), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dest


# ---------------------------------------------------------------------------- checkpoint exports


def write_export(directory: str | Path, encoder_state: dict[str, torch.Tensor], cfg: Config,
                 state: dict[str, Any],
                 extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The DeepSpeed-free part of a checkpoint: ``model.pt``, ``config.yaml``, ``state.json``
    and the task's ``extra`` weight files (``{file name: state dict}``)."""
    for name, weights in {MODEL_FILE: encoder_state, **(extra or {})}.items():
        write_weights(directory, name, weights)
    write_bytes(join(directory, CONFIG_FILE), cfg.to_yaml().encode())
    write_bytes(join(directory, STATE_FILE),
                json.dumps(state, indent=2, default=float).encode())


def write_weights(directory: str | Path, name: str, weights: dict[str, torch.Tensor]) -> None:
    """A state dict as the file ``name`` of ``directory``."""
    import torch

    buffer = io.BytesIO()
    torch.save(weights, buffer)
    write_bytes(join(directory, name), buffer.getvalue())


def read_weights(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict in the file ``name`` of ``directory``, on the CPU."""
    import torch

    return torch.load(io.BytesIO(read_bytes(join(directory, name))), map_location="cpu",
                      weights_only=True)


def read_state(directory: str | Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint ({} when it has none)."""
    uri = join(directory, STATE_FILE)
    return json.loads(read_text(uri)) if exists(uri) else {}


def _checkpoints(fs, path: str) -> list:
    """The ``checkpoint_*`` folders holding a model directly under ``path`` (file infos; Ray's
    own files such as ``checkpoint_manager_snapshot.json`` are not folders and never match)."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [i for i in fs.get_file_info(pafs.FileSelector(path))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
            and fs.get_file_info(i.path + "/" + MODEL_FILE).type == pafs.FileType.File]


def _newest(infos: list):
    return max(infos, key=lambda i: (i.mtime_ns or 0, i.base_name))


def find_checkpoint(uri: str | Path) -> str:
    """Accept a checkpoint dir, a run dir (its last ``checkpoint_*`` holding a model) or a
    folder of runs such as ``out/quickstart/runs`` (the newest run's last checkpoint); local or
    remote. Returns the checkpoint dir (a local path or the URI)."""
    uri = str(uri)
    if not is_remote(uri):
        uri = str(Path(uri.removeprefix("file://")).expanduser())
    if exists(join(uri, MODEL_FILE)):
        return uri
    fs, path = split(uri)
    found = _checkpoints(fs, path)
    if found:
        return join(uri, _newest(found).base_name)
    runs = []
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        for run in fs.get_file_info(pafs.FileSelector(path)):
            if run.type == pafs.FileType.Directory:
                last = _checkpoints(fs, run.path)
                if last:
                    runs.append((run.base_name, _newest(last)))
    if not runs:
        raise ConfigError(
            f"no raycmr checkpoint at '{uri}': give a checkpoint dir holding {MODEL_FILE}, "
            "a run dir holding checkpoint_* dirs, or a folder of runs (e.g. out/quickstart/runs)"
        )
    run, last = max(runs, key=lambda r: ((r[1].mtime_ns or 0), r[1].base_name))
    return join(join(uri, run), last.base_name)


def read_config(checkpoint: str | Path) -> Config:
    """The config a checkpoint was trained with, in today's keys (:func:`upgrade_saved`)."""
    stored = yaml.safe_load(read_text(join(find_checkpoint(checkpoint), CONFIG_FILE)))
    return config_from_dict(upgrade_saved(stored))


def load_exported(checkpoint: str | Path) -> tuple[DualEncoder, Config]:
    """The trained dual encoder (eval mode, CPU) and its config, without DeepSpeed."""
    import torch

    from raycmr.models.dual_encoder import DualEncoder

    directory = find_checkpoint(checkpoint)
    cfg = read_config(directory)
    if cfg.train.task == "slow":
        raise ConfigError(f"'{directory}' is a slow-model checkpoint: pass it as --rerank "
                          "next to a dual encoder's --checkpoint")
    model = DualEncoder(cfg.model, temperature=cfg.loss.temperature)
    state = torch.load(io.BytesIO(read_bytes(join(directory, MODEL_FILE))), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, cfg


def load_slow_exported(checkpoint: str | Path):
    """The trained slow model (:class:`raycmr.models.slow.SlowModel`, eval mode, CPU) and its
    config from a checkpoint of a ``train.task=slow`` run, without DeepSpeed."""
    import torch

    from raycmr.models.slow import build_slow_model

    directory = find_checkpoint(checkpoint)
    cfg = read_config(directory)
    if cfg.train.task != "slow":
        raise ConfigError(f"'{directory}' is a {cfg.train.task} checkpoint, not a slow model: "
                          "give a checkpoint of `raycmr train --config quickstart_slow`")
    state = torch.load(io.BytesIO(read_bytes(join(directory, MODEL_FILE))), map_location="cpu",
                       weights_only=True)
    model = build_slow_model(cfg.slow, state["vocab"], cfg.data.image_size,
                             cfg.data.max_text_len)
    model.load_state_dict(state)
    return model.eval(), cfg


def save_feature_teacher(model, directory: str | Path) -> str:
    """Write the distillation teacher ``model``
    (:class:`raycmr.models.feature_teacher.FeatureTeacher`) into ``directory``: its state dict
    and its config."""
    import dataclasses

    from raycmr.models.feature_teacher import CONFIG_FILE as TEACHER_CONFIG
    from raycmr.models.feature_teacher import WEIGHTS_FILE

    write_weights(directory, WEIGHTS_FILE, model.state_dict())
    write_bytes(join(directory, TEACHER_CONFIG),
                yaml.safe_dump(dataclasses.asdict(model.cfg), sort_keys=False).encode())
    return str(directory)


def load_feature_teacher(directory: str | Path):
    """The feature teacher :func:`save_feature_teacher` wrote in ``directory``, in eval mode."""
    from raycmr.models.feature_teacher import CONFIG_FILE as TEACHER_CONFIG
    from raycmr.models.feature_teacher import WEIGHTS_FILE, FeatureTeacher, FeatureTeacherConfig

    missing = [f for f in (WEIGHTS_FILE, TEACHER_CONFIG) if not exists(join(directory, f))]
    if missing:
        raise ConfigError(f"no feature teacher at '{directory}': missing {', '.join(missing)} "
                          "(write one with `raycmr teacher --checkpoint CKPT --out DIR`)")
    cfg = FeatureTeacherConfig.from_dict(yaml.safe_load(read_text(join(directory, TEACHER_CONFIG)))
                                         or {})
    model = FeatureTeacher(cfg)
    model.load_state_dict(read_weights(directory, WEIGHTS_FILE))
    return model.eval()


# --------------------------------------------------------------------------------- index folders


def write_index_folder(directory: str | Path, write_index: Callable[[str], None], ids: Any,
                       meta: dict[str, Any]) -> str:
    """Write ``index.faiss`` (``write_index(path)`` writes it), ``ids.parquet`` (``ids``: a
    sequence, or a pyarrow string array kept as it is) and ``meta.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = str(directory)
    write_index(join(directory, INDEX_FILE))
    if not isinstance(ids, pa.Array):
        ids = pa.array([str(i) for i in ids], type=pa.string())
    table = pa.table({"row": pa.array(np.arange(len(ids), dtype=np.int64)), "id": ids})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(join(directory, IDS_FILE), sink.getvalue())
    write_bytes(join(directory, META_FILE), json.dumps(meta, indent=2).encode())
    return directory


def read_index_folder(directory: str | Path) -> tuple[bytes, list[str], dict[str, Any]]:
    """``(serialised index, ids in row order, meta)`` of a folder written by
    :func:`write_index_folder`; FileNotFoundError naming what is missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [f for f in (INDEX_FILE, IDS_FILE, META_FILE) if not exists(join(directory, f))]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a raycmr index directory: missing {', '.join(missing)} (build "
            "one with `raycmr index` or save_index)"
        )
    meta = json.loads(read_text(join(directory, META_FILE)))
    table = pq.read_table(pa.BufferReader(read_bytes(join(directory, IDS_FILE))))
    rows = table.column("row").to_numpy()
    ids = table.column("id").to_pylist()
    if not np.array_equal(rows, np.arange(len(ids))):
        order = np.argsort(rows, kind="stable")
        ids = [ids[i] for i in order]
    return read_bytes(join(directory, INDEX_FILE)), ids, meta


def write_gallery(directory: str | Path, record: dict[str, Any]) -> None:
    """``gallery.json`` next to an index."""
    write_bytes(join(directory, GALLERY_FILE), json.dumps(record, indent=2).encode())


def read_gallery(directory: str | Path) -> dict[str, Any]:
    return json.loads(read_text(join(directory, GALLERY_FILE)))


def read_index_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads(read_text(join(directory, META_FILE)))
