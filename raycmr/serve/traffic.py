"""What ``raycmr serve`` shows while it runs: requests/s, p50/p95 latency and errors.

Every Ingress replica's ASGI app is wrapped in :class:`TrafficRecorder`, which times each HTTP
request and pushes ``(status, ms)`` to a small named Ray actor, :class:`TrafficBoard` (fire and
forget: a request never waits on it). ``raycmr serve`` creates the board before deploying and
drains it once per status interval into one console line (:func:`status_line`). Without a
board (``serve deploy`` of the same app) the recorder does nothing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

BOARD_NAME = "raycmr_serve_traffic"
BOARD_NAMESPACE = "raycmr"


@ray.remote(num_cpus=0)
class TrafficBoard:
    """``(status, ms)`` of the requests since the last ``drain``."""

    def __init__(self) -> None:
        self._requests: list[tuple[int, float]] = []

    def push(self, status: int, ms: float) -> None:
        self._requests.append((status, ms))

    def drain(self) -> list[tuple[int, float]]:
        out, self._requests = self._requests, []
        return out


def start_board():
    """The board ``raycmr serve`` drains (replaces one left by an earlier server)."""
    try:
        ray.kill(ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE))
    except ValueError:
        pass
    return TrafficBoard.options(name=BOARD_NAME, namespace=BOARD_NAMESPACE).remote()


class TrafficRecorder:
    """ASGI middleware: each HTTP request's final status and milliseconds to the board."""

    def __init__(self, app) -> None:
        self.app = app
        self._board: Any = None
        self._looked_up = 0.0

    def _find_board(self):
        now = time.monotonic()
        if self._board is None and now - self._looked_up > 5.0:  # look again now and then
            self._looked_up = now
            try:
                self._board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
            except ValueError:
                self._board = None
        return self._board

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            board = self._find_board()
            if board is not None:  # fire and forget; a push to a board gone is dropped
                board.push.remote(status[0], 1000 * (time.perf_counter() - t0))


def status_line(requests: list[tuple[int, float]], seconds: float, total: int,
                errors_total: int) -> str:
    """``14:02:07  3.2 requests/s  p50 41 ms  p95 88 ms  errors 0 (total: 96 requests, 0
    errors)``; errors are 5xx answers (a 4xx is the client's mistake, counted as a request)."""
    stamp = time.strftime("%H:%M:%S")
    errors = sum(1 for status, _ in requests if status >= 500)
    parts = [stamp, f"{len(requests) / seconds:.1f} requests/s"]
    if requests:
        ms = np.array([m for _, m in requests])
        parts += [f"p50 {np.percentile(ms, 50):.0f} ms", f"p95 {np.percentile(ms, 95):.0f} ms"]
    parts.append(f"errors {errors}")
    parts.append(f"(total: {total} requests, {errors_total} errors)")
    return "  ".join(parts)
