"""`raycmr index`: embed a gallery with Ray Data batch inference and write a FAISS index.

    raycmr index --checkpoint runs/NAME/checkpoint_... --split test --out out/index [--kind hnsw]
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
    p.add_argument("--kind", default=None, choices=["flat", "ivf", "hnsw"],
                   help="index kind (default: the checkpoint config's index.kind)")
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data embedding actors")
    p.add_argument("--batch-size", type=int, default=256, help="rows per embedding batch")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. index.nlist=256")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr index``."""
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError
    from raycmr.index.gallery import build_gallery_index

    try:
        build_gallery_index(args.checkpoint, args.split, args.out, kind=args.kind,
                            overrides=args.overrides, num_actors=args.num_actors,
                            batch_size=args.batch_size)
    except (ShardReadError, ShardSchemaError) as exc:
        raise ConfigError(str(exc)) from None
    return 0
