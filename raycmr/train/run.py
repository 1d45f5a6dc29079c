"""`raycmr train`'s entry: a dual encoder run, or DCKT's rounds when ``dckt.enabled``."""

from __future__ import annotations

from raycmr.config import Config


def train(cfg: Config):
    """Run training to the end; returns Ray Train's Result (metrics, checkpoint, path), or with
    ``dckt.enabled`` the DCKT rounds' :class:`~raycmr.train.dckt.DCKTResult` (same fields)."""
    from raycmr.runtime import init_ray

    if cfg.dckt.enabled:
        from raycmr.train.dckt import run_dckt

        return run_dckt(cfg)
    from raycmr.train.trainer import build_trainer

    init_ray(min_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 2)
    return build_trainer(cfg).fit()
