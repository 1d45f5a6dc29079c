"""`raycmr serve`: run the retrieval service on a local or existing Ray cluster (blocking).

    export RAYCMR_SERVE_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
    raycmr serve --checkpoint runs/NAME/checkpoint_... --index out/index [--port 8000]
    curl -X POST localhost:8000/search -H "Authorization: Bearer $RAYCMR_SERVE_TOKEN" \\
         -H 'content-type: application/json' -d '{"text": "a red circle on the left", "k": 5}'

An index built with ``raycmr index --slow SLOW`` stores the slow model's phi(x): the service
then re-ranks the fast top ``--rerank-k`` by ``h(x, y) + beta * f(x)^T g(y)`` (a request may
send its own ``rerank_k`` up to ``--max-rerank-k``, and ``beta``).

Without a token in ``RAYCMR_SERVE_TOKEN`` (or ``--token-file``) a random one is made and
printed; ``--no-auth`` turns the check off. The search page is at ``/``. For a long-lived
deployment use ``serve deploy jobs/serve_config.yaml`` (or the KubeRay RayService in
``cluster/kuberay/rayservice.yaml``): the same application builder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import time
import traceback
from pathlib import Path

from raycmr.config import ServeConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``raycmr serve``."""
    d = ServeConfig()
    p.add_argument("--checkpoint", required=True, help="checkpoint dir the index was built with")
    p.add_argument("--index", required=True, help="index dir written by `raycmr index`")
    p.add_argument("--slow", default=d.slow_checkpoint, metavar="SLOW",
                   help="slow-model checkpoint (default: the one whose phi(x) the index "
                        "stores; 'none' = no slow stage)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="candidates retrieved per query")
    p.add_argument("--rerank-k", type=int, default=d.rerank_k,
                   help="fast candidates the slow model re-ranks (0 = no slow stage)")
    p.add_argument("--max-rerank-k", type=int, default=d.max_rerank_k,
                   help="the most a request may ask to re-rank")
    p.add_argument("--beta", type=float, default=d.beta,
                   help="final score = h(x, y) + beta * fast score (requests may override)")
    p.add_argument("--route-prefix", default=d.route_prefix)
    p.add_argument("--host", default=d.host, help="HTTP host (0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--batch-wait-timeout-s", type=float, default=d.batch_wait_timeout_s)
    p.add_argument("--replicas", type=int, default=d.replicas,
                   help="replicas of every deployment at start")
    p.add_argument("--max-replicas", type=int, default=None,
                   help=f"autoscaling ceiling (default: max(--replicas, {d.max_replicas}))")
    p.add_argument("--token-file", default=d.token_file,
                   help=f"file holding the bearer token (default: ${d.token_env}, else a "
                        "random token printed at start)")
    p.add_argument("--no-auth", action="store_true", help="no token check (trusted networks)")
    p.add_argument("--docs", action="store_true", help="serve FastAPI's /docs")
    p.add_argument("--use-gpu", action="store_true", help="encoder and slow model on a GPU")
    p.add_argument("--status-every", type=float, default=10.0, metavar="S",
                   help="seconds between status lines (requests/s, p50/p95 ms, errors)")
    from raycmr.reporting.console import add_verbose_flag

    add_verbose_flag(p)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The :class:`ServeConfig` of the command line (validated by the plan)."""
    max_replicas = args.max_replicas or max(args.replicas, ServeConfig.max_replicas)
    return ServeConfig(
        checkpoint=args.checkpoint, index_path=args.index, slow_checkpoint=args.slow,
        top_k=args.top_k, rerank_k=args.rerank_k, max_rerank_k=args.max_rerank_k,
        beta=args.beta, route_prefix=args.route_prefix,
        host=args.host, port=args.port, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s, replicas=args.replicas,
        max_replicas=max_replicas, token_file=args.token_file,
        auth="none" if args.no_auth else "token", docs=args.docs, use_gpu=args.use_gpu)


class ServeStartError(RuntimeError):
    """The service did not start (a port taken, a replica that failed in its constructor):
    one line on the terminal, the whole error in the log."""


def _port_taken(host: str, port: int) -> bool:
    """True when nothing could listen on ``host:port`` here (another server holds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _last_line(error: BaseException | str) -> str:
    """The last line of an error's message (a Ray task error's first lines are its stack)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _why_not_started(exc: BaseException) -> str:
    """The cause of a failed start in one line: each failed deployment with the last line of
    its replica's error (Serve's application status holds it), else the error's last line."""
    from ray import serve

    from raycmr.serve.app import APP_NAME

    try:
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:  # noqa: BLE001 - no application status: the error itself says why
        return _last_line(exc)
    failed = [f"{name}: {_last_line(d.message)}" for name, d in deployments.items()
              if d.status == "DEPLOY_FAILED" and d.message]
    return "; ".join(failed) or _last_line(exc)


def _log_path(checkpoint: str) -> Path:
    """``serve.log`` in the checkpoint's run folder (``raycmr-logs/`` for a remote one)."""
    from raycmr.artifacts import find_checkpoint, is_remote

    checkpoint = find_checkpoint(checkpoint)
    return Path("raycmr-logs", "serve.log") if is_remote(checkpoint) \
        else Path(checkpoint).parent / "serve.log"


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, Kubernetes, ``kill``) stops the server as Ctrl-C does. Installed after
    Ray starts: Ray's core worker puts its own handler there, which dumps a C++ stack."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``raycmr serve``: build, deploy, print one status line at a time until
    Ctrl-C or SIGTERM (then "stopped", exit status 0). Ray Serve's and the replicas' lines go to
    ``serve.log`` in the checkpoint's run folder (``--verbose`` keeps them on the terminal)."""
    from raycmr.reporting.console import console_session

    cfg = serve_config(args)
    token = None  # read by the plan from the environment / token file
    generated = (cfg.auth == "token" and not cfg.token_file
                 and not os.environ.get(cfg.token_env, "").strip())
    if generated:
        token = secrets.token_urlsafe(24)
    log = _log_path(cfg.checkpoint)
    with console_session(log, args.verbose) as console:
        try:
            _serve(cfg, token, generated, console, log, args)
        except KeyboardInterrupt:
            pass
        console.print("stopped")
    return 0


def _serve(cfg: ServeConfig, token: str | None, generated: bool, console, log: Path,
           args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from raycmr.resources import check_cluster_fits
    from raycmr.runtime import init_ray
    from raycmr.serve.app import APP_NAME, build_from_plan, cpus_needed, serving_demand
    from raycmr.serve.plan import plan_app
    from raycmr.serve.traffic import start_board

    def say(line: str) -> None:
        console.print(line, markup=False)

    plan = plan_app(cfg, token)  # checks the paths before starting anything
    if not args.verbose:
        say(f"serve: Ray Serve's and the replicas' lines go to {log} (--verbose shows them here)")
    app = build_from_plan(plan)
    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if started_ray and _port_taken(cfg.host, cfg.port):  # the proxy would fail after a minute
        raise ServeStartError(f"port {cfg.port} on {cfg.host} is in use (another server?): stop "
                              "it, or pass --port with a free one")
    init_ray(min_cpus=cpus_needed(plan) + 1)
    _stop_on_sigterm()
    check_cluster_fits(serving_demand(plan))  # one line, not an app DEPLOYING forever
    try:
        board = start_board()
        prefix = "/" + cfg.route_prefix.strip("/")
        url = f"http://{cfg.host}:{cfg.port}{prefix.rstrip('/')}"
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
            serve.run(app, name=APP_NAME, route_prefix=prefix, blocking=False)
        except Exception as exc:
            traceback.print_exc()  # into the log
            raise ServeStartError(f"the service did not start: {_why_not_started(exc)} (the "
                                  f"whole error and the replicas' lines are in {log})") from exc
        say(f"serving at {url}/ (search page), {url}/search (POST), {url}/healthz; "
            "Ctrl-C stops")
        if generated:
            say(f"token (send 'Authorization: Bearer TOKEN'; set {cfg.token_env} to choose "
                f"your own): {token}")
        elif cfg.auth == "token":
            say(f"token: from {'$' + cfg.token_env if not cfg.token_file else cfg.token_file}")
        say(f"index: {plan.index_note}")
        for note in (plan.gallery_note, plan.slow_note):
            if note:
                say(f"note: {note}")
        if not plan.slow_note and plan.slow_checkpoint:
            say(f"slow stage: {plan.slow_checkpoint} re-ranks the fast top {plan.rerank_k} by "
                f"h + {plan.beta:g} * fast (requests: rerank_k <= {plan.max_rerank_k}, beta)")
        _status_lines(board, console, args.status_every)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM: let the stop finish
        if ray.is_initialized():
            serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()  # console_session then shuts the local Ray cluster down


def _status_lines(board, console, every: float) -> None:
    """One line per ``every`` seconds that saw requests (silent while idle); on a terminal one
    line rewritten in place."""
    import ray
    from rich.live import Live
    from rich.text import Text

    from raycmr.serve.traffic import status_line

    total = errors = 0
    live = Live(Text("waiting for requests"), console=console, transient=True,
                auto_refresh=False) if console.is_terminal else None
    if live is not None:
        live.start()
    try:
        last = time.monotonic()
        while True:
            time.sleep(every)
            requests = ray.get(board.drain.remote())
            now = time.monotonic()
            seconds, last = now - last, now
            total += len(requests)
            errors += sum(1 for status, _ in requests if status >= 500)
            line = status_line(requests, seconds, total, errors)
            if live is not None:
                live.update(Text(line), refresh=True)
            elif requests:
                console.print(line, markup=False)
    finally:
        if live is not None:
            live.stop()
