"""The page's sign-in: session cookies that hold no token, the https test, failed-login limits.

A session cookie is ``SID.EXPIRY.MAC``: a random session id, its expiry (Unix seconds) and an
HMAC-SHA256 of both under the service's session key (random per deployment, held by the
replicas only), so every Ingress replica checks it, expiry included, without shared state; the
bearer token never leaves the client's ``/login`` request. Redeploying the app signs everyone
out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque

COOKIE = "raycmr_session"


def new_session(key: str, lifetime_s: float, now: float | None = None) -> str:
    """A fresh session cookie value valid for ``lifetime_s`` seconds."""
    expiry = int((time.time() if now is None else now) + lifetime_s)
    body = f"{secrets.token_urlsafe(18)}.{expiry}"
    return f"{body}.{_mac(key, body)}"


def session_valid(key: str, value: str, now: float | None = None) -> bool:
    """True when ``value`` was signed with ``key`` and has not expired."""
    body, _, mac = value.rpartition(".")
    expiry = body.rpartition(".")[2]
    if not (key and mac and expiry.isdigit()) or not hmac.compare_digest(mac, _mac(key, body)):
        return False
    return int(expiry) > (time.time() if now is None else now)


def _mac(key: str, body: str) -> str:
    return hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()


def client_address(scope: dict, trusted_proxies: list[str]) -> str:
    """The client's IP: the connection's peer, or the last ``X-Forwarded-For`` hop when the
    peer is a trusted proxy."""
    peer = (scope.get("client") or ("", 0))[0]
    if peer in trusted_proxies:
        forwarded = _header(scope, b"x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[-1].strip()
    return peer


def is_https(scope: dict, public_https: bool, trusted_proxies: list[str]) -> bool:
    """Whether the client reached the service over https: configured so (``serve.public_https``),
    seen by the server itself, or said by a trusted proxy's ``X-Forwarded-Proto``."""
    if public_https or scope.get("scheme") == "https":
        return True
    peer = (scope.get("client") or ("", 0))[0]
    proto = _header(scope, b"x-forwarded-proto").split(",")[0].strip().lower()
    return peer in trusted_proxies and proto == "https"


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class FailedLogins:
    """Failed ``/login`` attempts per client over a sliding window: at ``limit`` failures within
    ``window_s`` seconds the client waits until the oldest one leaves the window. Remembers at
    most ``max_clients`` clients (the least recently failed are forgotten first)."""

    def __init__(self, limit: int, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait_s(self, client: str, now: float | None = None) -> float:
        """Seconds ``client`` must wait before its next attempt (0: may try now)."""
        now = time.monotonic() if now is None else now
        times = self.failures.get(client)
        if not times:
            return 0.0
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < self.limit:
            return 0.0
        return times[0] + self.window_s - now

    def failed(self, client: str, now: float | None = None) -> None:
        """Record one failed attempt of ``client``."""
        now = time.monotonic() if now is None else now
        self.failures.setdefault(client, deque(maxlen=self.limit)).append(now)
        self.failures.move_to_end(client)
        while len(self.failures) > self.max_clients:
            self.failures.popitem(last=False)
