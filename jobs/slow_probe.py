"""Single-process probe of the slow model (no Ray): train on image shards, then slow-only
text->image R@1 of the first ``--queries`` captions of a split against all of its images.

    python jobs/slow_probe.py --train out/quickstart/shards/train --eval out/quickstart/shards/val \
        --epochs 12 --set vision=fpn --set bidirectional=false

Used to choose the slow model's design on the validation split before it runs through
`raycmr train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from raycmr.config import SlowConfig, _coerce
from raycmr.data.paths import resolve_paths
from raycmr.data.text import load_text_encoder
from raycmr.data.transforms import preprocess_images
from raycmr.losses.captioning import captioning_loss
from raycmr.models.slow import build_slow_model, caption_vocab, num_parameters


def load_split(path: str, image_size: int, max_text_len: int) -> dict[str, torch.Tensor]:
    table = pq.ParquetDataset(resolve_paths([path])).read()
    out = preprocess_images(table, image_size=image_size, max_text_len=max_text_len,
                            encode=load_text_encoder("minilm"), augment=False, seed=0, epoch=0)
    return {k: torch.from_numpy(np.ascontiguousarray(out[k]))
            for k in ("pixel_values", "input_ids", "attention_mask", "group")}


@torch.no_grad()
def slow_only_recall(model, data: dict[str, torch.Tensor], queries: int) -> dict[str, float]:
    model.eval()
    groups = data["group"].numpy()
    _, first = np.unique(groups, return_index=True)
    first = np.sort(first)
    memory = torch.cat([model.encode_image(data["pixel_values"][first[i:i + 256]])
                        for i in range(0, len(first), 256)])
    image_of = {g: j for j, g in enumerate(groups[first])}
    ranks = []
    start = time.perf_counter()
    for q in range(min(queries, len(groups))):
        scores = model.score_candidates(memory, data["input_ids"][q:q + 1],
                                        data["attention_mask"][q:q + 1])[0]
        target = image_of[groups[q]]
        ranks.append(int((scores > scores[target]).sum()) + 1)
    per_query = (time.perf_counter() - start) / max(len(ranks), 1)
    ranks_a = np.array(ranks)
    model.train()
    return {"r1": float((ranks_a <= 1).mean()), "r5": float((ranks_a <= 5).mean()),
            "medr": float(np.median(ranks_a)), "s_per_query": per_query,
            "images": float(len(first))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", default="out/quickstart/shards/train")
    parser.add_argument("--eval", default="out/quickstart/shards/val")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--queries", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=0, help="epochs; 0 = at the end only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="SlowConfig field=value")
    args = parser.parse_args()

    fields = {f.name: f.type for f in dataclasses.fields(SlowConfig)}
    values = {}
    for item in args.set:
        key, raw = item.split("=", 1)
        typ = {"int": int, "float": float, "bool": bool, "str": str}[fields[key]]
        values[key] = _coerce(raw, typ, f"slow.{key}")
    cfg = SlowConfig(**values)
    torch.manual_seed(args.seed)
    train, held = load_split(args.train, 64, 24), load_split(args.eval, 64, 24)
    model = build_slow_model(cfg, caption_vocab(train["input_ids"], train["attention_mask"],
                                                cfg.max_vocab), 64, 24)
    print(f"config {cfg}\nparameters {num_parameters(model):,}, vocab {len(model.vocab)}, "
          f"image tokens {model.vision.num_tokens}", flush=True)
    steps = args.epochs * (len(train["group"]) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps,
                                                pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train["group"]), generator=gen)
        total = 0.0
        n = 0
        for s in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[s:s + args.batch_size]
            batch = {k: v[idx] for k, v in train.items()}
            loss = captioning_loss(model(batch))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, n = total + float(loss), n + 1
        line = f"epoch {epoch + 1} loss {total / n:.3f} train_s {time.perf_counter() - start:.0f}"
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            line += f" {slow_only_recall(model, held, args.queries)}"
        print(line, flush=True)
    print(f"final {slow_only_recall(model, held, args.queries)}", flush=True)


if __name__ == "__main__":
    main()
