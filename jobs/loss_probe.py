"""Single-process probe of the quickstart's contrastive loss (no Ray): decode the shards once,
train the dual encoder on in-memory batches, print validation text->image R@1 per epoch.

    python jobs/loss_probe.py [--epochs 8] [--batch 128] [--seed 0] [dotted overrides...]
    python jobs/loss_probe.py loss.kind=vse_mh loss.mh_warmup.loss=infonce

One process with batch 128 computes exactly the loss of 2 workers x 64 with global negatives
(raycmr.distributed); the optimizer mirrors the DeepSpeed config (AdamW, linear warm-up then
cosine to 1% of the LR, gradient clipping). Used to choose loss settings on the validation split
before a whole distributed run; it never reads the test split.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from raycmr.config import load_config
from raycmr.data.paths import resolve_paths
from raycmr.data.text import load_text_encoder
from raycmr.data.transforms import preprocess_images
from raycmr.evaluate.metrics import group_pairs, retrieval_metrics
from raycmr.train.dual_encoder.objective import CrossModalObjective

KEYS = ("pixel_values", "input_ids", "attention_mask", "group")


def load_split(paths: list[str], image_size: int, max_text_len: int) -> dict[str, torch.Tensor]:
    table = pq.ParquetDataset(resolve_paths(paths)).read()
    out = preprocess_images(table, image_size=image_size, max_text_len=max_text_len,
                            encode=load_text_encoder("minilm"), augment=False, seed=0, epoch=0)
    return {k: torch.from_numpy(np.ascontiguousarray(out[k])) for k in KEYS}


@torch.no_grad()
def validate(objective: CrossModalObjective, data: dict[str, torch.Tensor]) -> dict[str, float]:
    objective.eval()
    img, txt = [], []
    for i in range(0, len(data["group"]), 256):
        a, b = objective.encoder({k: v[i:i + 256] for k, v in data.items()})
        img.append(a)
        txt.append(b)
    objective.train()
    rows, txt_to_img = group_pairs(data["group"].numpy())
    return retrieval_metrics(torch.cat(img)[rows].numpy(), torch.cat(txt).numpy(), txt_to_img)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="quickstart")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(args.seed)
    d = cfg.data
    train = load_split(d.train, d.image_size, d.max_text_len)
    val = load_split(d.val, d.image_size, d.max_text_len)
    objective = CrossModalObjective(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(objective.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = len(train["group"]) // args.batch
    total = steps_per_epoch * args.epochs
    warm = max(1, min(t.warmup_steps, total - 1))

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        ratio = (step - warm) / max(1, total - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * ratio))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train["group"]), generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            parts = objective({k: v[idx] for k, v in train.items()}, progress=step / total)
            opt.zero_grad()
            parts["loss"].backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(parts["loss"].item())
        m = validate(objective, val)
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  val t2i R@1 {m['t2i_r1']:.1f}  "
              f"i2t R@1 {m['i2t_r1']:.1f}  rsum {m['rsum']:.1f}  ({time.time() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
