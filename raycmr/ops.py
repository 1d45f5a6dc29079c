"""DeepSpeed's CPU shared-memory collective op, built once per environment.

On CPU, DeepSpeed compiles its ``deepspeed_shm_comm`` op (``deepspeed.comm.torch.build_shm_op``)
with ``torch.utils.cpp_extension.load`` the first time a process initialises its comm backend:
about a minute of both cores. Its build folder is ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), shared by every Python environment of the user; the
``build.ninja`` of each environment names its own include paths, so two checkouts (two
``.venv``s) running one after the other rewrite it in turn and each rebuilds the op. And torch
runs whichever ``ninja`` comes first on ``PATH``: the environment's own (the ``ninja`` wheel,
1.13, build log format v7) when its ``bin`` is on ``PATH``, else the system's (Debian's 1.11,
log v5); each finds the other's log "too old" or "too new", deletes it and rebuilds everything,
so processes started with and without the environment on ``PATH`` (a Ray worker and the driver
of ``make test``) took turns compiling the op. raycmr therefore, in the driver and in every Ray
worker alike (both import raycmr): points ``TORCH_EXTENSIONS_DIR`` at a folder inside the
environment (``sys.prefix``) when the user has not set it, and puts the environment's ``bin``
first on ``PATH`` when it holds a ``ninja``. ``make install`` builds the op there once:

    python -c 'import raycmr.train.ops as o; o.main()'   # build (or confirm) the op; one line

(the build itself is in :mod:`raycmr.train.ops`: only ``raycmr.train`` imports DeepSpeed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OP_NAME = "deepspeed_shm_comm"
ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir() -> Path:
    """Where torch builds JIT extensions: ``$TORCH_EXTENSIONS_DIR``, set to
    ``<environment>/torch_extensions`` when unset; the environment's ``ninja`` first on
    ``PATH``."""
    os.environ.setdefault(ENV, str(Path(sys.prefix) / "torch_extensions"))
    env_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if Path(env_bin, "ninja").exists() and path[:1] != [env_bin]:
        os.environ["PATH"] = os.pathsep.join([env_bin, *[p for p in path if p != env_bin]])
    return Path(os.environ[ENV])


def op_library() -> Path | None:
    """The built op's shared library, or None when it has not been built here."""
    found = sorted(extensions_dir().rglob(f"{OP_NAME}.so"))
    return found[0] if found else None
