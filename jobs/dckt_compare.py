"""DCKT transfer vs target-only training on the Wikipedia features, in one run.

    python jobs/dckt_compare.py [--setup disjoint-pairs|disjoint-classes] [--per-class 15]
                                [--seed 0] [--workers 1] [dotted overrides for the DCKT run...]

Domains (from the Wikipedia training split; its validation split is carved out first, seeded):

* ``disjoint-pairs`` (default): target = ``--per-class`` labelled pairs of each of the 10
  classes; source = every other training pair (all 10 classes, disjoint from the target's
  pairs). Target test = the whole published test split (693 pairs).
* ``disjoint-classes``: source = every training pair of classes 1-5; target =
  ``--per-class`` pairs of each of classes 6-10 (labels 0-4 in the target's own label space);
  target val/test = the val/test pairs of classes 6-10.

Methods, each evaluated on the target test pairs (mAP@all, image->text and text->image, the
Wikipedia protocol) from its last checkpoint (no selection on test):

* ``target-only``: the project's Wikipedia recipe (``configs/wikipedia.yaml``: MLP towers,
  VSE++ + DSCMR) trained on the target pairs alone for about as many optimizer steps as the
  whole DCKT run;
* ``dckt round k``: :func:`raycmr.train.dckt.rounds.run_dckt` with ``configs/dckt_wikipedia.yaml``;
  round 0 is the joint pretraining with the MMD links off, rounds >= 1 the progressive transfer.

Prints a table and writes ``out/dckt_compare/result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycmr.config import load_config
from raycmr.data.writers import write_wikipedia_shards
from raycmr.evaluate.checkpoint import evaluate_checkpoint

OUT = Path("out/dckt_compare")
DEFAULT_WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikipedia"


def build_domains(wiki: Path, setup: str, per_class: int, seed: int) -> dict:
    """Write ``OUT/shards/{source,target,val,test}`` and return their sizes and classes."""
    splits = OUT / "wiki"
    if not (splits / "test").exists():
        write_wikipedia_shards(wiki, splits, val_fraction=0.15, seed=0, overwrite=True)
    tables = {name: pq.read_table(splits / name) for name in ("train", "val", "test")}
    train = tables["train"]
    labels = train["label"].to_numpy()
    rng = np.random.default_rng(seed)
    if setup == "disjoint-pairs":
        target_classes, offset = np.arange(10), 0
        source_mask = np.ones(len(labels), dtype=bool)
    else:  # disjoint-classes
        target_classes, offset = np.arange(5, 10), 5
        source_mask = labels < 5
    target_idx = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in target_classes])
    source_mask[target_idx] = False

    def target_space(table: pa.Table) -> pa.Table:
        keep = pc.is_in(table["label"], pa.array(target_classes.tolist(), pa.int64()))
        table = table.filter(keep)
        return table.set_column(table.schema.get_field_index("label"), "label",
                                pc.subtract(table["label"], offset))

    parts = {
        "source": train.filter(pa.array(source_mask)),
        "target": target_space(train.take(pa.array(np.sort(target_idx)))),
        "val": target_space(tables["val"]),
        "test": target_space(tables["test"]),
    }
    sizes = {}
    for name, table in parts.items():
        directory = OUT / "shards" / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.parquet"):
            old.unlink()
        pq.write_table(table, directory / "part-0.parquet")
        sizes[name] = {"pairs": table.num_rows,
                       "classes": len(np.unique(table["label"].to_numpy()))}
    return sizes


def _eval(checkpoint: str) -> dict:
    m = evaluate_checkpoint(checkpoint, "test", num_actors=1)
    return {k: m[k] for k in ("i2t_map", "t2i_map", "avg_map")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", default="disjoint-pairs",
                        choices=["disjoint-pairs", "disjoint-classes"])
    parser.add_argument("--per-class", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--wiki", default=str(DEFAULT_WIKI))
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the DCKT config")
    args = parser.parse_args(argv)
    start = time.time()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the log readable

    shutil.rmtree(OUT / "runs", ignore_errors=True)  # a rerun must not resume the last one
    sizes = build_domains(Path(args.wiki), args.setup, args.per_class, args.seed)
    print(f"domains ({args.setup}): {json.dumps(sizes)}", flush=True)
    n_target = sizes["target"]["classes"]
    common = [f"train.num_workers={args.workers}", f"train.seed={args.seed}",
              "train.torch_threads=1", f"model.num_classes={n_target}"]

    from raycmr.train.dckt.rounds import plan_dckt, run_dckt
    from raycmr.train.run import train

    # both configs first, so that the two runs see the same code and config files
    dckt_cfg = load_config("dckt_wikipedia", common + ["train.name=dckt"] + args.overrides)
    _, plan = plan_dckt(dckt_cfg)
    # target-only: the Wikipedia recipe on the target pairs, about as many optimizer steps
    batch = 32
    per_epoch = max((sizes["target"]["pairs"] // args.workers) // batch, 1)
    epochs = math.ceil(plan.total_steps / per_epoch)
    base_cfg = load_config("wikipedia", common + [
        f"data.train=[{OUT}/shards/target]", f"data.val=[{OUT}/shards/val]",
        f"data.test=[{OUT}/shards/test]", f"train.batch_size={batch}", f"train.epochs={epochs}",
        f"train.checkpoint_every_epochs={epochs}", "train.num_to_keep=1", "train.log_every=100",
        f"train.storage_path={OUT}/runs", "train.name=target-only",
    ])

    t0 = time.time()
    dckt = run_dckt(dckt_cfg, name="dckt")
    if dckt.error:
        print(f"DCKT failed: {dckt.error}", file=sys.stderr)
        return 1
    dckt_time = time.time() - t0
    dckt_rows = [_eval(r.checkpoint_path) for r in dckt.rounds]
    print(f"DCKT test mAP by round: {dckt_rows}", flush=True)

    t0 = time.time()
    base = train(base_cfg)
    if base.error:
        print(f"target-only training failed: {base.error}", file=sys.stderr)
        return 1
    base_time = time.time() - t0

    rows = [{"method": "target-only (wikipedia recipe)", "target_pairs": sizes["target"]["pairs"],
             "steps": int(base.metrics["step"]), "train_s": round(base_time, 1),
             **_eval(base.checkpoint.path)}]
    for record, test_map in zip(dckt.rounds, dckt_rows):
        sel = record.selection
        label = "dckt round 0 (MMD off)" if record.round == 0 else f"dckt round {record.round}"
        rows.append({"method": label,
                     "target_pairs": sizes["target"]["pairs"] if sel is None else sel.count,
                     "steps": int(record.metrics["step"]),
                     "train_s": round(dckt_time, 1) if record is dckt.rounds[-1] else None,
                     **test_map})
    final, baseline = rows[-1], rows[0]
    diff = {k: final[k] - baseline[k] for k in ("i2t_map", "t2i_map", "avg_map")}

    print(f"\nWikipedia, {args.setup}: source {sizes['source']['pairs']} pairs "
          f"({sizes['source']['classes']} classes), target {sizes['target']['pairs']} pairs "
          f"({n_target} classes), target test {sizes['test']['pairs']} pairs; seed {args.seed}")
    print(f"{'method':32s} {'tgt pairs':>9s} {'steps':>6s} {'i2t mAP':>8s} {'t2i mAP':>8s} "
          f"{'avg mAP':>8s}")
    for r in rows:
        print(f"{r['method']:32s} {r['target_pairs']:9d} {r['steps']:6d} {r['i2t_map']:8.4f} "
              f"{r['t2i_map']:8.4f} {r['avg_map']:8.4f}")
    print(f"{'dckt final - target-only':32s} {'':9s} {'':6s} {diff['i2t_map']:+8.4f} "
          f"{diff['t2i_map']:+8.4f} {diff['avg_map']:+8.4f}")
    total = time.time() - start
    print(f"time: dckt {dckt_time:.0f} s, target-only {base_time:.0f} s, total {total:.0f} s")

    result = {
        "setup": args.setup, "per_class": args.per_class, "seed": args.seed,
        "workers": args.workers, "domains": sizes, "rows": rows, "dckt_minus_target_only": diff,
        "selection": [{"round": r.round, "selected": r.selection.count,
                       "expected": r.selection.expected, "mean_ap": float(r.selection.ap.mean()),
                       "topped_up": r.selection.topped_up}
                      for r in dckt.rounds if r.selection is not None],
        "dckt_config": dckt_cfg.to_dict(), "target_only_config": base_cfg.to_dict(),
        "time_s": {"dckt": dckt_time, "target_only": base_time, "total": total},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "result.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {OUT / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
