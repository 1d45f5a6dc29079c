"""The slow stage on minimal pairs and on ordinary captions: one row of figures per slow
checkpoint, for the table in docs/slow_stage.md.

    python jobs/slow_minimal_pairs.py --fast FAST_CKPT --slow SLOW_CKPT --pairs out/mp_val \
        [--split val] [--k 10 20] [--slow-queries 250] [--json OUT]

Two `raycmr eval --rerank` comparisons (raycmr/evaluate/fast_slow.py), both text->image with
beta 0: (1) the minimal-pair shards at ``--pairs`` as ``data.<split>``: group accuracy of fast,
fast+slow at each K and slow-only over every caption, overall and per kind of swap; (2) the
slow checkpoint's own ``data.<split>`` shards (the quickstart's): R@1 of fast, fast+slow at each
K, and slow-only over the first ``--slow-queries`` captions. Choose on ``--split val`` with a
validation minimal-pair set (any seed but 0); read the seed-0 set as ``--split test`` once per
shipped configuration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raycmr.evaluate.fast_slow import evaluate_fast_slow, markdown_table

METHODS = ("fast", "fast+slow", "slow-only")


def summary_row(pair_rows: list[dict], caption_rows: list[dict]) -> dict[str, float]:
    """``{method[@K]}_group_acc[_kind]`` from the minimal-pair rows and ``{method[@K]}_r1`` from
    the ordinary-caption rows."""
    out: dict[str, float] = {}
    for rows, keys in ((pair_rows, "group_acc"), (caption_rows, "t2i_r1")):
        for r in rows:
            name = r["method"] + (f"@{r['k']}" if r["method"] == "fast+slow" else "")
            out.update({f"{name}_{k}": v for k, v in r.items() if k.startswith(keys)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", required=True)
    parser.add_argument("--slow", required=True)
    parser.add_argument("--pairs", required=True, help="minimal-pair shards")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--slow-queries", type=int, default=250)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    pair_rows, n_pairs = evaluate_fast_slow(args.fast, args.slow, args.split, args.k, 0.0, 1,
                                            [f"data.{args.split}=[{args.pairs}]"])
    print(f"minimal pairs {args.pairs} ({n_pairs} images):\n{markdown_table(pair_rows)}\n")
    caption_rows, n_img = evaluate_fast_slow(args.fast, args.slow, args.split, args.k, 0.0,
                                             args.slow_queries)
    print(f"{args.split} split ({n_img} images):\n{markdown_table(caption_rows)}\n")
    row = {"slow": args.slow, "fast": args.fast, "pairs": args.pairs, "split": args.split,
           **summary_row(pair_rows, caption_rows)}
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
