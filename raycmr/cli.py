"""`raycmr` command line: one command per package, each in its ``<package>/cli.py``.

    raycmr shards synthetic --out data/synth --train 4000 --val 500 --test 500
    raycmr train --config quickstart train.num_workers=2 loss.margin=0.2
    raycmr eval --checkpoint runs/NAME/checkpoint_... [--split test]
    raycmr config --config wikipedia loss.dscmr.alpha=0.2
    raycmr tune --config wikipedia tune.num_samples=8
    raycmr train --config quickstart_slow slow.fast_checkpoint=runs/NAME/checkpoint_...
    raycmr index --checkpoint runs/NAME/checkpoint_... --slow SLOW --split test --out out/index
    raycmr serve --checkpoint runs/NAME/checkpoint_... --index out/index
    raycmr teacher --checkpoint runs/NAME/checkpoint_... --out out/teacher   # feature shards
"""

from __future__ import annotations

import argparse
import sys

from raycmr.config import ConfigError
from raycmr.configs import cli as config_cli
from raycmr.data import cli as shards_cli
from raycmr.evaluate import cli as eval_cli
from raycmr.index import cli as index_cli
from raycmr.serve import cli as serve_cli
from raycmr.teacher import cli as teacher_cli
from raycmr.train import cli as train_cli
from raycmr.tune import cli as tune_cli

#: command -> (its module with add_arguments + run, one-line help)
COMMANDS = {
    "shards": (shards_cli, "write Parquet shards (synthetic, folder, wikipedia)"),
    "train": (train_cli, "train a dual encoder with Ray Train + DeepSpeed"),
    "eval": (eval_cli, "R@K / mAP of a checkpoint on a split"),
    "config": (config_cli, "print the resolved config"),
    "tune": (tune_cli, "search hyperparameters with Ray Tune"),
    "index": (index_cli, "embed a gallery (Ray Data), write a FAISS index (+ phi(x) with --slow)"),
    "teacher": (teacher_cli, "feature checkpoints: fit the distillation teacher"),
    "serve": (serve_cli, "run the retrieval service (Ray Serve, blocking)"),
}

#: retired command -> the one-line error that names its replacement
RETIRED = {"reranker": "`raycmr reranker` is now `raycmr teacher` (it fits the feature-shard "
                       "distillation teacher): run `raycmr teacher --checkpoint CKPT --out DIR`"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycmr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError
    from raycmr.data.text import TokenizerError
    from raycmr.serve.cli import ServeStartError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in RETIRED:
        print(f"raycmr: error: {RETIRED[argv[0]]}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ShardReadError, ShardSchemaError, TokenizerError,
            ServeStartError) as exc:
        print(f"raycmr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
