"""`raycmr` command line: shards, train, eval, tune.

    raycmr shards synthetic --out data/synth --train 4000 --val 500 --test 500
    raycmr train --config quickstart train.num_workers=2 loss.margin=0.2
    raycmr eval --checkpoint runs/NAME/checkpoint_... [--split test]
    raycmr tune --config wikipedia tune.num_samples=8
    raycmr index --checkpoint runs/NAME/checkpoint_... --split test --out out/index
    raycmr reranker --checkpoint runs/NAME/checkpoint_... --out out/index/reranker
    raycmr serve --checkpoint runs/NAME/checkpoint_... --index out/index
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from raycmr.config import Config, ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="a shipped config name (quickstart, wikipedia, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_workers=2")


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, float):
            print(f"  {key:28s} {value:.4f}")
        else:
            print(f"  {key:28s} {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from raycmr.train.run import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    _print_metrics("final metrics:", {k: v for k, v in result.metrics.items()
                                      if isinstance(v, (int, float, str))})
    best = result.best_checkpoints[-1][0] if result.best_checkpoints else result.checkpoint
    print(f"run dir:    {result.path}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if best is not None:
        print(f"best:       {best.path}")
    if args.eval_test and best is not None:
        if not cfg.data.test:
            raise ConfigError("--eval-test needs data.test shards in the config")
        metrics = evaluate_checkpoint(best.path, "test")
        _print_metrics(f"test metrics of the best checkpoint by validation ({best.path}):",
                       metrics)
    return 0


def evaluate_checkpoint(checkpoint: str, split: str = "test", overrides: list[str] | None = None,
                        num_actors: int = 2) -> dict[str, float]:
    """Embed a split with Ray Data actors and compute its retrieval report."""
    from raycmr.config import with_overrides
    from raycmr.data.embed import embed_split
    from raycmr.evaluate.summary import evaluate_embeddings
    from raycmr.runtime import init_ray
    from raycmr.train.checkpoint import load_exported

    model, cfg = load_exported(checkpoint)
    if overrides:
        from raycmr.config import parse_overrides

        flat = _flatten(parse_overrides(overrides))
        cfg = with_overrides(cfg, flat)
    paths = cfg.data.test if split == "test" else cfg.data.val
    if not paths:
        raise ConfigError(f"the checkpoint's config has no data.{split} shards: "
                          f"pass data.{split}=[PATH]")
    init_ray(min_cpus=num_actors + 1)
    emb = embed_split(paths, cfg, model.state_dict(), num_actors=num_actors)
    return evaluate_embeddings(emb)


def _flatten(nested: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        if isinstance(v, dict) and k not in ("space", "hf_config"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    metrics = evaluate_checkpoint(args.checkpoint, args.split, args.overrides)
    _print_metrics(f"{args.split} metrics ({args.checkpoint}):", metrics)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(metrics, fh, indent=2)
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    cfg: Config = load_config(args.config, args.overrides)
    print(cfg.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycmr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from raycmr.data import shards_cli

    p = sub.add_parser("shards", help="write Parquet shards (synthetic, folder, wikipedia)")
    shards_cli.add_arguments(p)
    p.set_defaults(func=shards_cli.run)

    p = sub.add_parser("train", help="train a dual encoder with Ray Train + DeepSpeed")
    _add_config_args(p)
    p.add_argument("--eval-test", action="store_true",
                   help="after training, evaluate the best checkpoint (by the validation metric) "
                        "on data.test: only once the configuration is fixed on validation")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="R@K / mAP of a checkpoint on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.test=[other/test]")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_show_config)

    from raycmr import index_build
    from raycmr.serve import cli as serve_cli

    p = sub.add_parser("index", help="embed a gallery (Ray Data) and write a FAISS index")
    index_build.add_arguments(p)
    p.set_defaults(func=index_build.run)

    from raycmr import rerank_train

    p = sub.add_parser("reranker", help="train the cross-attention reranker (Serve, distillation)")
    rerank_train.add_arguments(p)
    p.set_defaults(func=rerank_train.run)

    p = sub.add_parser("serve", help="run the retrieval service (Ray Serve, blocking)")
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.run)

    try:
        from raycmr.tune import cli as tune_cli
    except ImportError:
        tune_cli = None
    if tune_cli is not None:
        p = sub.add_parser("tune", help="search hyperparameters with Ray Tune")
        tune_cli.add_arguments(p)
        p.set_defaults(func=tune_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"raycmr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
