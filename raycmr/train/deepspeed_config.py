"""The DeepSpeed config dict for one training run, derived from the raycmr config."""

from __future__ import annotations

from typing import Any

import torch

from raycmr.config import Config


def resolve_precision(cfg: Config) -> str:
    """bf16 (or fp16 where the GPU lacks bf16) on GPU, fp32 on CPU, unless the config pins it."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if cfg.train.use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def deepspeed_config(cfg: Config, total_steps: int) -> dict[str, Any]:
    """AdamW + warmup-then-cosine LR (DeepSpeed's WarmupCosineLR), ZeRO stage, clipping,
    gradient accumulation and mixed precision, as one DeepSpeed config dict."""
    t = cfg.train
    # DeepSpeed wants warmup >= 1 and total > warmup
    warmup = max(1, min(t.warmup_steps, total_steps - 1))
    total_steps = max(total_steps, warmup + 1)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999]},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
                "cos_min_ratio": 0.01,
            },
        },
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,  # raycmr logs itself
        "wall_clock_breakdown": False,
    }
    precision = resolve_precision(cfg)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    # The CPU build of DeepSpeed's fused Adam needs a compiler at run time; torch's AdamW does
    # the same update without one.
    if not (t.use_gpu and torch.cuda.is_available()):
        ds["optimizer"]["params"]["torch_adam"] = True
    return ds
