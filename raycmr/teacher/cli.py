"""`raycmr teacher`: fits the feature teacher of a feature checkpoint (Wikipedia features),
the teacher that ``loss.distill.feature_teacher`` names.

    raycmr teacher --checkpoint runs/NAME/checkpoint_... --out out/teacher   # features only

Image checkpoints are refused: their slow model is the captioning model of Miech et al. 2021,
trained on the cluster by the engine and stored with the index:

    raycmr train --config quickstart_slow slow.fast_checkpoint=FAST
    raycmr index --checkpoint FAST --slow SLOW --out out/index
"""

from __future__ import annotations

import argparse

from raycmr.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr teacher``."""
    p.add_argument("--checkpoint", required=True, help="dual encoder checkpoint (or run dir)")
    p.add_argument("--out", required=True,
                   help="directory to write (what loss.distill.feature_teacher names)")
    p.add_argument("--split", default="train", help="train, val, test or shard paths")
    p.add_argument("--eval-split", default="val",
                   help="held-out pairs for the R@1 report ('' to skip)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--candidates", type=int, default=100,
                   help="images each held-out query ranks in the R@1 report")
    p.add_argument("--fast-weight", type=float, default=0.0,
                   help="0 (a distillation teacher): the model's own score; > 0: a residual "
                        "scorer, + this x the dual encoder's score (not usable as a teacher)")
    p.add_argument("--num-actors", type=int, default=2, help="Ray Data embedding actors")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr teacher``."""
    from raycmr.data.paths import ShardReadError
    from raycmr.data.schema import ShardSchemaError
    from raycmr.teacher.train import train_teacher

    try:
        report = train_teacher(
            args.checkpoint, args.out, split=args.split, eval_split=args.eval_split,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
            heads=args.heads, layers=args.layers, candidates=args.candidates,
            num_actors=args.num_actors, fast_weight=args.fast_weight)
    except (ShardReadError, ShardSchemaError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"teacher: {report['pairs']} pairs, {report['steps']} steps, fast weight "
          f"{report['fast_weight']:.2f}, loss "
          f"{report['first_loss']:.3f} -> {report['last_loss']:.3f}, "
          f"{report['fit_s']:.1f} s -> {report['out']}")
    if "fast_r1" in report:
        print(f"held-out text->image R@1 among {report['candidates']} images "
              f"({report['eval_pairs']} pairs): dual encoder {report['fast_r1']:.1f}%, "
              f"teacher {report['teacher_r1']:.1f}%")
        if report["teacher_r1"] < report["fast_r1"]:
            print("note: the teacher ranks worse than the dual encoder on these held-out pairs; "
                  "train it longer (--steps) before distilling from it")
    return 0
