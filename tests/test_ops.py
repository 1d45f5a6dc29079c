"""DeepSpeed's CPU shm op is built once, into the environment, and a Ray worker (where the
training ranks initialise DeepSpeed's comm) loads that build without compiling it again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raycmr import ops


def _build_state() -> tuple[Path, int, str]:
    lib = ops.op_library()
    assert lib is not None, "DeepSpeed's shm op is not built: run `make install`"
    return lib, lib.stat().st_mtime_ns, (lib.parent / ".ninja_log").read_text()


def test_the_op_lives_in_this_environment_and_install_says_so() -> None:
    lib, _, _ = _build_state()
    assert lib.is_relative_to(ops.extensions_dir())
    env = {k: v for k, v in os.environ.items() if k != ops.ENV}
    code = f"import os, raycmr; print(os.environ[{ops.ENV!r}])"
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=env).stdout.strip()
    assert Path(default) == Path(sys.prefix) / "torch_extensions"
    venv_ninja = Path(sys.executable).parent / "ninja"
    if venv_ninja.exists():  # the environment's ninja, whatever PATH the process started with
        code = "import shutil, raycmr; print(shutil.which('ninja'))"
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True, env={**env, "PATH": "/usr/bin:/bin"}).stdout.strip()
        assert found == str(venv_ninja)
    out = subprocess.run([sys.executable, "-c", "import raycmr.train.ops as o; o.main()"],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"DeepSpeed's CPU shared-memory op: already built in {lib.parent}"]


@pytest.mark.ray
def test_a_ray_worker_loads_the_op_without_rebuilding(ray_cluster) -> None:
    lib, mtime, ninja_log = _build_state()

    @ray_cluster.remote(num_cpus=1)
    def load_in_worker() -> str:
        import importlib
        import os

        importlib.import_module("raycmr")  # as every training worker does before DeepSpeed
        import shutil

        shm = importlib.import_module("deepspeed.comm.torch")
        assert shm.build_shm_op() is not None
        return os.environ["TORCH_EXTENSIONS_DIR"], shutil.which("ninja")

    folder, ninja = ray_cluster.get(load_in_worker.remote())
    assert Path(folder) == ops.extensions_dir()
    assert ninja == shutil.which("ninja")  # one ninja: another's build log means a rebuild
    assert lib.stat().st_mtime_ns == mtime  # not relinked
    assert (lib.parent / ".ninja_log").read_text() == ninja_log  # nothing recompiled
