"""Fast vs fast+slow vs slow-only text->image retrieval as K grows: a Markdown table and a PNG
of R@1 and time per query against K (the re-ranked fast top-K).

    python jobs/fast_slow.py --fast FAST_CKPT --slow SLOW_CKPT [--split test] [--beta 0]
        [--k 5 10 20 50 100 0] [--queries N] [--slow-queries 250] [--out out/fast_slow]

K = 0 re-ranks every image. Writes OUT/fast_slow.md and OUT/fast_slow.png. Time per query:
the gallery's fast embeddings, phi(x) and the slow decoders' cross-attention keys/values of
phi(x) are computed once, before timing, for every method alike; the methods take turns chunk by
chunk of 64 queries (raycmr/evaluate/fast_slow.py); the machine's load average before and
after is printed with the table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from raycmr.evaluate.fast_slow import evaluate_fast_slow, markdown_table


def plot(rows: list[dict], path: Path, n_img: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = [r for r in rows if r["method"] == "fast+slow"]
    fast = next((r for r in rows if r["method"] == "fast"), None)
    slow = next((r for r in rows if r["method"] == "slow-only"), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ks = [r["k"] for r in fs]
    ax1.plot(ks, [r["t2i_r1"] for r in fs], "o-", label="fast+slow R@1")
    ax1.plot(ks, [r["fast_recall_at_k"] for r in fs], "s--", label="fast recall@K (ceiling)")
    if fast:
        ax1.axhline(fast["t2i_r1"], color="grey", ls=":", label="fast R@1")
    if slow:
        ax1.axhline(slow["t2i_r1"], color="red", ls=":", label="slow-only R@1")
    ax1.set(xscale="log", xlabel="K (re-ranked fast top-K)", ylabel="%",
            title=f"text->image, {n_img} images")
    ax1.legend(fontsize=8)
    ax2.plot(ks, [r["ms_per_query"] for r in fs], "o-", label="fast+slow")
    if fast:
        ax2.axhline(fast["ms_per_query"], color="grey", ls=":", label="fast")
    if slow:
        ax2.axhline(slow["ms_per_query"], color="red", ls=":", label="slow-only")
    ax2.set(xscale="log", yscale="log", xlabel="K", ylabel="ms per query",
            title="time per query (this CPU)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", required=True, help="dual encoder checkpoint")
    parser.add_argument("--slow", required=True, help="slow model checkpoint")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50, 100, 0])
    parser.add_argument("--queries", type=int, default=0,
                        help="only the first N captions query, for every method (0 = all)")
    parser.add_argument("--slow-queries", type=int, default=250)
    parser.add_argument("--out", default="out/fast_slow")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows, n_img = evaluate_fast_slow(args.fast, args.slow, args.split, args.k, args.beta,
                                     args.slow_queries, queries=args.queries)
    load_after = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    load = (f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, "
            f"after {'/'.join(f'{x:.1f}' for x in load_after)}, {os.cpu_count()} CPUs")
    (out / "fast_slow.md").write_text(
        f"{args.split} split, text->image, {n_img} images, beta {args.beta}; {load}\n\n"
        f"{table}\n")
    print(load)
    plot(rows, out / "fast_slow.png", n_img)
    print(table)
    print(f"wrote {out / 'fast_slow.md'} and {out / 'fast_slow.png'}")


if __name__ == "__main__":
    main()
