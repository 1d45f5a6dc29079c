"""`raycmr config`: print the resolved config (a shipped name or a YAML path + dotted overrides).

    raycmr config --config wikipedia loss.dscmr.alpha=0.2
"""

from __future__ import annotations

import argparse

from raycmr.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr config``."""
    p.add_argument("--config", default=None,
                   help="a shipped config name (quickstart, wikipedia, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_workers=2")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr config``."""
    print(load_config(args.config, args.overrides).to_yaml())
    return 0
