"""A bounded load test of a running service with replicas killed under it.

``clients`` concurrent HTTP clients send searches for ``duration_s`` seconds while, at evenly
spaced moments, one replica of each named deployment in turn is killed with ``ray.kill`` (as a
crashed process would die; Serve then starts a replacement). Every request counts: a non-200
answer or a connection error is a failure. Used by ``jobs/serve_load_test.py`` and the tests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

SERVE_NAMESPACE = "serve"


def replica_actor_names(app: str, deployment: str) -> list[str]:
    """Named actors of a deployment's live replicas."""
    import ray

    from raycmr.compat import serve_replica_prefix

    prefix = f"{serve_replica_prefix()}{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix))


def kill_one_replica(app: str, deployment: str) -> str:
    """Kill one replica actor of ``deployment`` (no restart: Serve replaces it); its name."""
    import ray

    names = replica_actor_names(app, deployment)
    if not names:
        raise RuntimeError(f"no live replica of {app}/{deployment}")
    ray.kill(ray.get_actor(names[0], namespace=SERVE_NAMESPACE), no_restart=True)
    return names[0]


@dataclass
class LoadReport:
    requests: int = 0
    failures: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # "500", "ConnectError", ... -> count
    failed_at: list[float] = field(default_factory=list)  # seconds in when each failed
    failure_notes: list[str] = field(default_factory=list)  # the first few answers, for a look
    killed: list[tuple[float, str]] = field(default_factory=list)  # (seconds in, replica)
    duration_s: float = 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def failures_after(self) -> dict[str, int]:
        """Failures that came after each kill and before the next one."""
        out = {"before any kill": 0, **{name: 0 for _, name in self.killed}}
        for t in self.failed_at:
            last = [name for at, name in self.killed if at <= t]
            out[last[-1] if last else "before any kill"] += 1
        return out

    def summary(self) -> dict[str, Any]:
        rate = self.failures / self.requests if self.requests else 0.0
        return {"requests": self.requests, "failures": self.failures,
                "failure_rate": round(rate, 5),
                "p50_ms": round(self.percentile_ms(50), 1),
                "p99_ms": round(self.percentile_ms(99), 1),
                "requests_per_s": round(self.requests / self.duration_s, 1)
                if self.duration_s else 0.0,
                "errors": dict(self.errors), "killed": [n for _, n in self.killed],
                "failures_after": self.failures_after(), "failure_notes": self.failure_notes}


async def _run(url: str, headers: dict[str, str], bodies: list[dict[str, Any]], clients: int,
               duration_s: float, kills: list[tuple[str, str]], report: LoadReport) -> None:
    import httpx

    start = time.perf_counter()
    deadline = start + duration_s

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            i = c
            while time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await http.post("/search", json=body)
                    ok, kind, note = r.status_code == 200, str(r.status_code), r.text[:300]
                except httpx.HTTPError as exc:
                    ok, kind, note = False, type(exc).__name__, str(exc)[:300]
                report.requests += 1
                if ok:
                    report.latencies_s.append(time.perf_counter() - t0)
                else:
                    report.failures += 1
                    report.failed_at.append(time.perf_counter() - start)
                    if len(report.failure_notes) < 5:
                        report.failure_notes.append(f"{kind}: {note}")
                    report.errors[kind] = report.errors.get(kind, 0) + 1

    async def killer() -> None:
        for n, (app, deployment) in enumerate(kills):
            at = start + duration_s * (n + 1) / (len(kills) + 1)
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            at_s = time.perf_counter() - start
            name = await asyncio.to_thread(kill_one_replica, app, deployment)
            report.killed.append((at_s, name))

    await asyncio.gather(killer(), *[client(c) for c in range(clients)])
    report.duration_s = time.perf_counter() - start


def run_load(url: str, bodies: list[dict[str, Any]], *, headers: dict[str, str] | None = None,
             clients: int = 8, duration_s: float = 60.0,
             kills: list[tuple[str, str]] | None = None) -> LoadReport:
    """Run the load (and the kills: ``(app, deployment)`` pairs, in turn) and report."""
    report = LoadReport()
    asyncio.run(_run(url, headers or {}, bodies, clients, duration_s, kills or [], report))
    return report
