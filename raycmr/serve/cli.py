"""`raycmr serve`: run the retrieval service on a local or existing Ray cluster (blocking).

    raycmr serve --checkpoint runs/NAME/checkpoint_... --index out/index [--port 8000]
    curl -X POST localhost:8000/search -H 'content-type: application/json' \\
         -d '{"text": "a red circle on the left", "k": 5}'

For a long-lived deployment use ``serve deploy jobs/serve_config.yaml`` (or the KubeRay
RayService in ``cluster/kuberay/rayservice.yaml``): the same application builder.
"""

from __future__ import annotations

import argparse

from raycmr.config import ServeConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr serve``."""
    d = ServeConfig()
    p.add_argument("--checkpoint", required=True, help="checkpoint dir the index was built with")
    p.add_argument("--index", required=True, help="index dir written by `raycmr index`")
    p.add_argument("--reranker", default="",
                   help="reranker dir (default: INDEX/reranker if present; 'none' = off)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="candidates retrieved per query")
    p.add_argument("--rerank-k", type=int, default=d.rerank_k, help="candidates reranked")
    p.add_argument("--route-prefix", default=d.route_prefix)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--use-gpu", action="store_true", help="encoder and reranker on a GPU")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr serve``: build, deploy and block until Ctrl-C."""
    from ray import serve

    from raycmr.runtime import init_ray
    from raycmr.serve.app import APP_NAME, build_app

    app = build_app({
        "checkpoint": args.checkpoint, "index_path": args.index, "reranker": args.reranker,
        "top_k": args.top_k, "rerank_k": args.rerank_k, "route_prefix": args.route_prefix,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s, "use_gpu": args.use_gpu,
    })  # checks the paths before starting anything
    init_ray(min_cpus=4)
    serve.start(http_options={"host": args.host, "port": args.port})
    prefix = "/" + args.route_prefix.strip("/")
    url = f"http://{args.host}:{args.port}{prefix.rstrip('/')}"
    print(f"serving {args.index} at {url}/search (POST), {url}/healthz; Ctrl-C stops",
          flush=True)
    serve.run(app, name=APP_NAME, route_prefix=prefix, blocking=True)
    return 0
