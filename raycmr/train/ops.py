"""Build DeepSpeed's CPU shared-memory op once into the environment (``make install``); where
and why: :mod:`raycmr.ops`."""

from __future__ import annotations

import time

from raycmr.ops import extensions_dir, op_library


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
