"""`raycmr index`: embed a gallery with Ray Data batch inference and write a FAISS index.

    raycmr index --checkpoint runs/NAME/checkpoint_... --split test --out out/index [--kind hnsw]
    raycmr index --checkpoint FAST --slow SLOW --split test --out out/index
    raycmr index --checkpoint FAST --split test --out out/index --kind auto --target-recall 0.95

With ``--slow`` (a checkpoint of ``raycmr train --config quickstart_slow``) the slow model's
phi(x) of every gallery image is stored too (``out/index/phi/``, float16, memory-mapped by the
Serve slow stage); its size is printed.
"""

from __future__ import annotations

import argparse

from raycmr.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr index``."""
    p.add_argument("--checkpoint", required=True, help="checkpoint dir (or run dir: newest one)")
    p.add_argument("--split", default="test",
                   help="test, val, or shard paths (comma-separated) holding the gallery")
    p.add_argument("--out", required=True, help="index directory to write (path or URI)")
    p.add_argument("--slow", default=None, metavar="SLOW",
                   help="slow-model checkpoint: also store its phi(x) of every image for the "
                        "Serve slow stage (image galleries)")
    p.add_argument("--kind", default=None, choices=["flat", "ivf", "hnsw", "auto"],
                   help="index kind (default: the checkpoint config's index.kind); auto: the "
                        "fastest kind and search setting that reaches --target-recall, measured "
                        "on the gallery's own vectors")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="with --kind auto: recall@10 against exact search to reach")
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data embedding actors")
    p.add_argument("--batch-size", type=int, default=256, help="rows per embedding batch")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. index.nlist=256")
    from raycmr.reporting.console import add_verbose_flag

    add_verbose_flag(p)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr index``: a rows/s bar on the console; Ray's lines go to
    ``index.log`` in the checkpoint's run folder (``--verbose`` keeps them on screen)."""
    from pathlib import Path

    from raycmr.artifacts import find_checkpoint, is_remote
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError
    from raycmr.index.gallery import build_gallery_index
    from raycmr.reporting.console import console_session

    checkpoint = find_checkpoint(args.checkpoint)
    log = Path("raycmr-logs", "index.log") if is_remote(checkpoint) \
        else Path(checkpoint).parent / "index.log"
    with console_session(log, args.verbose) as console:
        if not args.verbose:
            console.print(f"index: Ray's lines go to {log} (--verbose shows them here)")
        try:
            build_gallery_index(checkpoint, args.split, args.out, kind=args.kind,
                                target_recall=args.target_recall,
                                overrides=args.overrides, slow=args.slow,
                                num_actors=args.num_actors,
                                batch_size=args.batch_size, console=console)
        except (ShardReadError, ShardSchemaError) as exc:
            raise ConfigError(str(exc)) from None
    return 0
