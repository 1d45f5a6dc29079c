"""The retrieval service: a Ray Serve application of four or five deployments.

    HTTP -> Ingress (FastAPI) -> QueryEncoder (batched: tokenizer + text tower)
                              -> Retriever    (batched: FAISS top_k over the gallery)
                              -> SlowScorer     (batched: the slow model's h(x, y) over the fast
                                               top rerank_k, phi(x) read from the index)
                              -> Gallery      (image galleries: thumbnails, image -> text)

Fast and slow stages as in Miech et al., "Thinking Fast and Slow" (CVPR 2021). The modules:
:mod:`~raycmr.serve.plan` checks arguments and files before any Ray work,
:mod:`~raycmr.serve.scoring` holds the pure functions, :mod:`~raycmr.serve.deployments` the
deployments, :mod:`~raycmr.serve.http` the routes, auth and limits (its docstring lists the
endpoints) and ``page.html`` the search page at ``/``.

``build_app(args)`` is the application builder named by ``raycmr.serve.app:build_app`` in Serve
config files (``serve deploy``, KubeRay RayService); ``args`` are :class:`ServeConfig` keys.
Every deployment starts with ``replicas`` replicas and autoscales up to ``max_replicas``; the
Ingress retries a search whose downstream replica died. ``route_prefix``, ``host`` and ``port``
are applied by whoever runs the application (``raycmr serve``, or the config file's own).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from raycmr.config import ServeConfig
from raycmr.resources import Demand, check_cluster_fits
from raycmr.serve.deployments import (
    Gallery,
    Ingress,
    QueryEncoder,
    Retriever,
    SlowScorer,
    StageLog,
)
from raycmr.serve.plan import ServePlan, plan_app

APP_NAME = "raycmr"
INGRESS_CPUS = 0.1


def scaling(cfg: ServeConfig) -> dict[str, Any]:
    """Replica options of every deployment: fixed, or autoscaling from ``replicas`` to
    ``max_replicas``."""
    if cfg.max_replicas == cfg.replicas:
        return {"num_replicas": cfg.replicas}
    return {"autoscaling_config": {"min_replicas": cfg.replicas,
                                   "initial_replicas": cfg.replicas,
                                   "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": 2 * cfg.max_batch_size}}


def cpus_needed(plan: ServePlan) -> float:
    """Logical CPUs the application's starting replicas reserve."""
    models = 2 + bool(plan.slow_checkpoint) + plan.has_images
    return plan.serve.replicas * (models + INGRESS_CPUS)


def serving_demand(plan: ServePlan) -> Demand:
    """What the application's starting replicas reserve: one bundle per replica of each
    deployment (model deployments 1 CPU, + 1 GPU with ``use_gpu`` where they run a model)."""
    cfg = plan.serve
    gpu = {"GPU": 1.0} if cfg.use_gpu else {}
    models = {"QueryEncoder": {"CPU": 1.0, **gpu}, "Retriever": {"CPU": 1.0}}
    if plan.slow_checkpoint:
        models["SlowScorer"] = {"CPU": 1.0, **gpu}
    if plan.has_images:
        models["Gallery"] = {"CPU": 1.0, **gpu}
    models["Ingress"] = {"CPU": INGRESS_CPUS}
    names = [name for name in models for _ in range(cfg.replicas)]
    return Demand(bundles=[dict(models[n]) for n in names], labels=names,
                  what=f"serving ({cfg.replicas} replicas of {', '.join(models)})",
                  settings="serve.replicas, serve.use_gpu, serve.rerank_k (0 = no slow stage)",
                  replaces_serve_app=APP_NAME)  # a redeploy frees the running app's replicas


def build_app(args: dict[str, Any] | ServeConfig, token: str | None = None) -> Application:
    """Serve application builder (``raycmr.serve.app:build_app``); see the module docstring.

    Checks every path first and raises :class:`ConfigError` naming a missing or mismatched
    checkpoint, index or slow checkpoint (or a missing token) before anything is deployed; when Ray is
    already connected (``serve deploy``, ``serve run``), also that the cluster can hold the
    starting replicas (else the application would stay DEPLOYING forever).
    """
    import ray

    plan = plan_app(args, token)
    if ray.is_initialized():
        check_cluster_fits(serving_demand(plan))
    return build_from_plan(plan)


def build_from_plan(plan: ServePlan) -> Application:
    """The application of a checked plan (see :func:`build_app`)."""
    cfg = plan.serve
    model_opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if cfg.use_gpu else 0}
    batched = {"max_ongoing_requests": max(2 * cfg.max_batch_size, 8), **scaling(cfg)}
    encoder = QueryEncoder.options(ray_actor_options=model_opts, **batched).bind(plan)
    retriever = Retriever.options(ray_actor_options={"num_cpus": 1}, **batched).bind(plan)
    slow = gallery = None
    if plan.slow_checkpoint:
        slow = SlowScorer.options(ray_actor_options=dict(model_opts), **batched).bind(plan)
    if plan.has_images:
        gallery = Gallery.options(ray_actor_options=dict(model_opts), **batched).bind(plan)
    return Ingress.options(ray_actor_options={"num_cpus": INGRESS_CPUS},
                           max_ongoing_requests=64, **scaling(cfg)).bind(
        encoder, retriever, slow, gallery, StageLog.bind(), plan)
