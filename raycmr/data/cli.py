"""``raycmr shards synthetic|folder|wikipedia``: write Parquet shards and print a summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raycmr.data.paths import ShardReadError
from raycmr.data.schema import ShardSchemaError
from raycmr.data.writers import WriteSummary

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WIKIPEDIA = "../shared/data/wikipedia"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``synthetic``, ``folder`` and ``wikipedia`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="shards_command", required=True, metavar="SOURCE")

    p = sub.add_parser("synthetic", help="procedural coloured-shape images with captions")
    p.add_argument("--out", required=True, help="output dir; gets train/ val/ test/")
    p.add_argument("--train", type=int, default=4000, help="training images")
    p.add_argument("--val", type=int, default=500, help="validation images")
    p.add_argument("--test", type=int, default=500, help="test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--captions-per-image", type=int, default=1)
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--image-format", choices=["png", "jpeg"], default="png")
    p.add_argument("--domain", choices=["mixed", "plain", "noisy"], default="mixed",
                   help="background style; 'domain' column")
    p.add_argument("--overwrite", action="store_true", help="replace existing part-*.parquet")
    p.add_argument("--minimal-pairs", type=int, default=0, metavar="N",
                   help="instead of train/val/test: N groups of images that differ in one "
                        "binding (two objects' colours, shapes or positions swapped) as shards "
                        "in OUT with columns group and swap, for `raycmr eval`'s group accuracy")
    p.add_argument("--hard-images", action="store_true",
                   help="follow each training scene with its rendered hard negatives (one "
                        "colour, shape and position swap between two of its objects, each "
                        "captioned); the rows carry a group column (train with data.group_size)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes rendering shards in parallel (the files are the same as "
                   "with 1)")

    p = sub.add_parser("folder", help="a folder of images + a CSV/JSONL captions file")
    p.add_argument("--images", required=True, help="folder holding the image files")
    p.add_argument("--captions", required=True,
                   help="CSV/TSV/JSONL with columns image, caption [, id, image_id, label, domain]")
    p.add_argument("--out", required=True, help="output dir for part-*.parquet")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace existing part-*.parquet")

    p = sub.add_parser("wikipedia", help="the Wikipedia SIFT/LDA feature set -> feature shards")
    p.add_argument("--src", default=DEFAULT_WIKIPEDIA,
                   help="folder with raw_features.mat and the .list files (relative paths are "
                   "tried from the current dir, then from the repository root)")
    p.add_argument("--out", required=True, help="output dir; gets train/ val/ test/")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace existing part-*.parquet")


def resolve_src(src: str) -> Path:
    """``src`` as given when it exists, else relative to the repository root."""
    path = Path(src).expanduser()
    if path.is_dir() or path.is_absolute():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.is_dir() else path


def print_summaries(summaries: dict[str, WriteSummary], out: str) -> None:
    """One block per split plus a total line."""
    total = WriteSummary()
    for name, summary in summaries.items():
        print(summary.format(name))
        total = total.merge(summary)
    if len(summaries) > 1:
        print(total.format("total"))
    print(f"shards written under {out}")


def _run(args: argparse.Namespace) -> dict[str, WriteSummary]:
    if args.shards_command == "synthetic" and args.minimal_pairs > 0:
        from raycmr.data.synthetic import write_minimal_pairs

        return {"minimal pairs": write_minimal_pairs(
            args.out, args.minimal_pairs, args.seed, image_size=args.image_size,
            rows_per_shard=args.rows_per_shard, image_format=args.image_format,
            domain=args.domain, overwrite=args.overwrite)}
    if args.shards_command == "synthetic":
        from raycmr.data.synthetic import write_synthetic_splits

        return write_synthetic_splits(
            args.out, args.train, args.val, args.test, args.seed, image_size=args.image_size,
            captions_per_image=args.captions_per_image, rows_per_shard=args.rows_per_shard,
            image_format=args.image_format, domain=args.domain, overwrite=args.overwrite,
            workers=args.workers, hard_images=args.hard_images,
        )
    if args.shards_command == "folder":
        from raycmr.data.writers import write_folder_shards

        return {"folder": write_folder_shards(args.images, args.captions, args.out,
                                              args.rows_per_shard, overwrite=args.overwrite)}
    from raycmr.data.writers import write_wikipedia_shards

    return write_wikipedia_shards(resolve_src(args.src), args.out, args.val_fraction, args.seed,
                                  rows_per_shard=args.rows_per_shard, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    """Write the shards named by ``args``; print the summary. 0 on success, 2 on a user error."""
    try:
        summaries = _run(args)
    except (FileNotFoundError, FileExistsError, ShardReadError, ShardSchemaError,
            ValueError) as exc:
        print(f"raycmr shards: error: {exc}", file=sys.stderr)
        return 2
    print_summaries(summaries, args.out)
    return 0
