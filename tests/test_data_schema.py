"""Shard path resolution and the driver-side schema check: clear errors naming file and fix."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycmr.data.paths import ShardReadError, detect_format, resolve_paths
from raycmr.data.pipeline import count_rows
from raycmr.data.schema import ShardSchemaError, check_shards, image_shard_schema


def _write(path, n=3, **columns):
    cols = {"id": [str(i) for i in range(n)], "image": [b"x"] * n, "caption": ["c"] * n}
    cols.update(columns)
    cols = {k: v for k, v in cols.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_missing_column_names_column_file_and_fix(tmp_path):
    f = _write(tmp_path / "a.parquet", caption=None)
    with pytest.raises(ShardSchemaError) as err:
        check_shards([str(tmp_path)], "images")
    msg = str(err.value)
    assert "'caption'" in msg and str(f) in msg and "raycmr shards" in msg
    assert "\n" not in msg
    with pytest.raises(ShardSchemaError, match="'image_feat', 'text_feat'"):
        check_shards([str(f)], "features")


def test_wrong_column_type_is_named(tmp_path):
    f = _write(tmp_path / "a.parquet", caption=[1, 2, 3])
    with pytest.raises(ShardSchemaError, match="column 'caption' has type int64"):
        check_shards([str(f)], "images")


def test_good_shard_passes_and_reports_columns(tmp_path):
    _write(tmp_path / "d" / "part-0.parquet", label=[1, 2, 3])
    info = check_shards([str(tmp_path / "d")], "images")
    assert info.format == "parquet"
    assert info.columns == ["id", "image", "caption", "label"]


def test_non_parquet_file_gives_clear_error(tmp_path):
    bad = tmp_path / "part-0.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(ShardReadError, match=f"'{bad}' is not a readable Parquet file"):
        check_shards([str(bad)], "images")
    readme = tmp_path / "README.md"
    readme.write_text("# hello")
    with pytest.raises(ShardReadError, match="README.md' is not a readable Parquet"):
        check_shards([str(readme)], "images")


def test_missing_paths_and_empty_globs_are_named(tmp_path):
    with pytest.raises(ShardReadError, match=f"'{tmp_path / 'nope'}' does not exist"):
        resolve_paths([str(tmp_path / "nope")])
    with pytest.raises(ShardReadError, match=r"glob '.*\*.parquet' matches no files"):
        resolve_paths([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardReadError, match="holds no shard files"):
        resolve_paths([str(tmp_path / "empty")])
    with pytest.raises(ShardReadError, match="no shard paths"):
        resolve_paths([])


def test_dirs_globs_and_files_resolve_sorted_and_deduplicated(tmp_path):
    a = _write(tmp_path / "s" / "part-1.parquet")
    b = _write(tmp_path / "s" / "sub" / "part-0.parquet")
    _write(tmp_path / "s" / "_tmp.parquet")  # hidden/temporary files are skipped
    (tmp_path / "s" / "notes.txt").write_text("x")
    got = resolve_paths([str(tmp_path / "s"), str(tmp_path / "s" / "*.parquet"), str(a)])
    assert got == [str(a), str(b)]
    assert resolve_paths([str(tmp_path / "s" / "sub" / "*.parquet")]) == [str(b)]


def test_format_detection(tmp_path):
    assert detect_format(["a.tar", "b.tar"]) == "webdataset"
    assert detect_format(["a.parquet"]) == "parquet"
    assert detect_format(["a.tar"], "parquet") == "parquet"
    with pytest.raises(ShardReadError, match="mix .tar"):
        detect_format(["a.tar", "b.parquet"])


def test_webdataset_first_sample_is_checked(tmp_path):
    good = _tar(tmp_path / "good.tar", {"k0.jpg": b"x", "k0.txt": b"a", "k1.png": b"y",
                                         "k1.txt": b"b"})
    info = check_shards([str(good)], "images")
    assert (info.format, info.columns) == ("webdataset", ["id", "image", "caption"])
    bad = _tar(tmp_path / "bad.tar", {"k0.jpg": b"x", "k0.json": b"{}", "k1.txt": b"b"})
    with pytest.raises(ShardSchemaError, match="missing key.txt"):
        check_shards([str(bad)], "images")
    with pytest.raises(ShardSchemaError, match="feature shards must be Parquet"):
        check_shards([str(good)], "features")
    notatar = tmp_path / "x.tar"
    notatar.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ShardReadError, match="not a readable tar"):
        check_shards([str(notatar)], "images")


def test_count_rows_from_metadata(tmp_path):
    _write(tmp_path / "p" / "a.parquet", n=7)
    _write(tmp_path / "p" / "b.parquet", n=5)
    assert count_rows([str(tmp_path / "p")]) == 12
    t = _tar(tmp_path / "w.tar", {"k0.jpg": b"x", "k0.txt": b"a", "k1.jpg": b"y",
                                   "k1.txt": b"b", "k1.json": b"{}", "k2.png": b"z"})
    assert count_rows([str(t)]) == 3
    assert image_shard_schema([]).names == ["id", "image", "caption"]
