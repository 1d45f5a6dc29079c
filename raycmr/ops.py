"""DeepSpeed's CPU shared-memory collective op, built once per environment.

On CPU, DeepSpeed compiles its ``deepspeed_shm_comm`` op (``deepspeed.comm.torch.build_shm_op``)
with ``torch.utils.cpp_extension.load`` the first time a process initialises its comm backend:
about a minute of both cores. Its build folder is ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), shared by every Python environment of the user; the
``build.ninja`` of each environment names its own include paths, so two checkouts (two
``.venv``s) running one after the other rewrite it in turn and each rebuilds the op. raycmr
points ``TORCH_EXTENSIONS_DIR`` at a folder inside the environment itself (``sys.prefix``) when
the user has not set it, in the driver and in every Ray worker alike (both import raycmr), and
``make install`` builds the op there once:

    python -c 'import raycmr.ops as o; o.main()'   # build (or confirm) the op; one line
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OP_NAME = "deepspeed_shm_comm"
ENV = "TORCH_EXTENSIONS_DIR"


def extensions_dir() -> Path:
    """Where torch builds JIT extensions: ``$TORCH_EXTENSIONS_DIR``, set to
    ``<environment>/torch_extensions`` when unset."""
    os.environ.setdefault(ENV, str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ[ENV])


def op_library() -> Path | None:
    """The built op's shared library, or None when it has not been built here."""
    found = sorted(extensions_dir().rglob(f"{OP_NAME}.so"))
    return found[0] if found else None


def build_op() -> str:
    """Build DeepSpeed's shm comm op into :func:`extensions_dir` (a no-op when it is built and
    up to date); returns the line ``make install`` prints."""
    extensions_dir()
    before = op_library()
    stamp = before.stat().st_mtime_ns if before else None
    t0 = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op

    if build_shm_op() is None:
        return "DeepSpeed's CPU shared-memory op: not used on this platform (gloo instead)"
    lib = op_library()
    if lib is not None and lib.stat().st_mtime_ns == stamp:
        return f"DeepSpeed's CPU shared-memory op: already built in {lib.parent}"
    return (f"DeepSpeed's CPU shared-memory op: built once into {lib.parent if lib else '?'} "
            f"in {time.perf_counter() - t0:.0f} s; training runs, tests and the quickstart "
            "reuse it")


def main() -> None:
    """``make install``'s step: build the op, print one line (DeepSpeed's own prints hidden)."""
    import contextlib
    import io

    chatter = io.StringIO()  # DeepSpeed's accelerator warning and "built successfully" print
    with contextlib.redirect_stdout(chatter):
        line = build_op()
    print(line, flush=True)
