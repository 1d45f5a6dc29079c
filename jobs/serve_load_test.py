"""Load test of the retrieval service with replicas killed under it (issue 10's bound).

    python jobs/serve_load_test.py [--clients 8] [--duration 60] [--gallery 2000]

Builds a small service of its own (a synthetic gallery of ``--gallery`` 32-px images with
captions, an untrained ViT/BERT dual encoder and an untrained slow captioning model, a FAISS
flat index with the slow model's phi(x) stored next to it) on a local Ray cluster of 12
logical CPUs, deploys it with 2 replicas of every deployment, then runs ``--clients``
concurrent clients (caption queries) for ``--duration`` seconds while one replica of each
deployment (Ingress, QueryEncoder, Retriever, SlowScorer, Gallery) is killed in turn with
``ray.kill``. Prints the requests, failures, p50/p99 latency and what was killed; exits 1 when
1% or more of the requests failed.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import tempfile
from pathlib import Path

DEPLOYMENTS = ("Ingress", "QueryEncoder", "Retriever", "SlowScorer", "Gallery")
IMAGE_SIZE, MAX_LEN = 32, 16


def build_service_files(root: Path, n_images: int) -> tuple[Path, Path, list[str]]:
    """Gallery shards, fast and slow checkpoints, index with phi(x) under ``root``; returns
    (fast checkpoint, index, caption queries)."""
    import pyarrow.parquet as pq
    import torch

    from raycmr.artifacts import write_export
    from raycmr.config import load_config
    from raycmr.configs.tiny import TINY_SLOW, TINY_TOWERS
    from raycmr.data.synthetic import write_synthetic_split
    from raycmr.index.gallery import build_gallery_index
    from raycmr.models.dual_encoder import DualEncoder
    from raycmr.models.slow import build_slow_model

    write_synthetic_split(root / "gallery", "test", n_images, seed=0, image_size=IMAGE_SIZE,
                          progress=False)
    data = [f"data.test=[{root / 'gallery'}]", f"data.image_size={IMAGE_SIZE}",
            f"data.max_text_len={MAX_LEN}"]
    fast_cfg = load_config("quickstart", data + [
        "model.embed_dim=16",
        *TINY_TOWERS])
    slow_cfg = load_config("quickstart_slow", data + TINY_SLOW)
    torch.manual_seed(0)
    for name, model, cfg in (
            ("fast", DualEncoder(fast_cfg.model), fast_cfg),
            ("slow", build_slow_model(slow_cfg.slow, torch.arange(1000, 3000), IMAGE_SIZE,
                                      MAX_LEN), slow_cfg)):
        (root / name).mkdir()
        write_export(root / name, model.state_dict(), cfg, {"epoch": 0})
    build_gallery_index(str(root / "fast"), "test", root / "index", slow=str(root / "slow"),
                        num_actors=1)
    captions = pq.read_table(root / "gallery", columns=["caption"]).column("caption")
    return root / "fast", root / "index", captions.to_pylist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--gallery", type=int, default=2000, help="images in the gallery")
    p.add_argument("--replicas", type=int, default=2, help="replicas of every deployment")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--no-kill", action="store_true", help="the same load without kills")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from raycmr.serve.app import APP_NAME, build_app
    from raycmr.serve.loadtest import run_load

    with tempfile.TemporaryDirectory(prefix="raycmr-load-") as tmp:
        ray.init(address="local", num_cpus=12, log_to_driver=False)
        ckpt, index, queries = build_service_files(Path(tmp), args.gallery)
        token = secrets.token_urlsafe(24)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"checkpoint": str(ckpt), "index_path": str(index), "top_k": 50,
                             "rerank_k": 20, "replicas": args.replicas,
                             "max_replicas": args.replicas}, token=token),
                  name=APP_NAME, route_prefix="/")
        bodies = [{"text": q, "k": args.k} for q in queries[:256]]
        kills = [] if args.no_kill else [(APP_NAME, d) for d in DEPLOYMENTS]
        print(f"load: {args.clients} clients x {args.duration:.0f} s, {args.replicas} replicas "
              f"of each deployment, killing one replica of {', '.join(d for _, d in kills)}"
              if kills else f"load: {args.clients} clients x {args.duration:.0f} s, no kills",
              flush=True)
        report = run_load(f"http://127.0.0.1:{port}", bodies,
                          headers={"Authorization": f"Bearer {token}"}, clients=args.clients,
                          duration_s=args.duration, kills=kills)
        serve.shutdown()
        ray.shutdown()
    summary = report.summary()
    after = report.failures_after()
    for at, name in report.killed:
        print(f"  killed {name} at {at:.1f} s: {after[name]} failure(s) after it")
    print(f"requests {summary['requests']}, failures {summary['failures']} "
          f"({100 * summary['failure_rate']:.2f}%), p50 {summary['p50_ms']} ms, "
          f"p99 {summary['p99_ms']} ms, {summary['requests_per_s']} req/s"
          + (f", errors {summary['errors']}" if summary["errors"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["failure_rate"] < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
