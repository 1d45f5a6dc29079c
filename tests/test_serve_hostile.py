"""A hostile client against one real Serve app (a tiny image gallery with the slow stage and its
token on): every attack of benchmarks/serve_hostile_probe.py gets its exact status and a one-line
``{"detail": ...}`` body with no traceback, path, pid, address or colour code; afterwards the
service still answers and the Gallery replica's peak memory grew by less than 100 MB. Also the
session cookie, the failed-login limit, the page's headers and the one-line 500, without Ray
where they can be."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import running_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_hostile_probe import TOKEN, attacks, build_files, fire, gallery_memory_mb

MAX_BODY = 1_000_000
LIMITS = "JPEG, PNG or WebP"
EXPECTED = {  # attack -> (status, text the one-line detail holds)
    "malformed_json": (422, "the request body is not valid JSON"),
    "json_not_an_object": (422, "the request body: Input should be a valid dictionary"),
    "unknown_field": (422, ("unknown field 'rerank_kk' (known: text, text_feat, k, rerank, "
                           "rerank_k, beta)")),
    "k_not_a_number": (422, "'k': Input should be a valid integer"),
    "k_huge": (422, "'k': Input should be less than or equal to 10000"),
    "beta_1e39": (422, "'beta': Input should be less than or equal to 1000"),
    "beta_nan": (422, "'beta': Input should be a finite number"),
    "rerank_k_negative": (422, "'rerank_k': Input should be greater than or equal to 0"),
    "body_over_limit": (413, f"limit of {MAX_BODY} bytes (serve.max_body_bytes)"),
    "chunked_over_limit": (413, f"limit of {MAX_BODY} bytes (serve.max_body_bytes)"),
    "chunked_image_over_limit": (413, f"limit of {MAX_BODY} bytes (serve.max_body_bytes)"),
    "non_image": (422, f"not a decodable image: send a {LIMITS} file"),
    "truncated_png": (422, "not a decodable image (PNG"),
    "gif": (415, f"image format GIF is not accepted: send {LIMITS}"),
    "tiff": (415, f"image format TIFF is not accepted: send {LIMITS}"),
    "bmp": (415, f"image format BMP is not accepted: send {LIMITS}"),
    "wide_1x20000_png": (413, "image is 20000 x 1 pixels; the limit is 12000 per side"),
    "huge_1x1000000_png": (413, "image is 1000000 x 1 pixels; the limit is 12000 per side"),
    "huge_20000x20000_png": (413, "more pixels than PIL's decompression-bomb limit"),
    "k_image_huge": (422, "'k': Input should be less than or equal to 100"),
    "missing_token": (401, "this service needs a token"),
    "wrong_token": (403, "wrong token"),
    "token_in_cookie_raw": (401, "this service needs a token"),
    "path_traversal": (404, "no image '../../../etc/passwd' in the gallery"),
    "path_long_id": (404, "no image 'aaaa"),
    "login_wrong": (403, "wrong token"),
    "login_unknown_field": (422, "unknown field 'x' (known: token)"),
}
LEAKS = re.compile(r"Traceback|File \"|pid=|ip=|\x1b|/tmp/|/work/|site-packages|ray::|"
                   r"\d+\.\d+\.\d+\.\d+")


@pytest.fixture(scope="module")
def hostile(ray_cluster, tmp_path_factory):
    """The app (trusting 127.0.0.1 as a proxy, so a test can pose as other clients) and the
    Gallery replica's peak memory before any attack."""
    tmp = tmp_path_factory.mktemp("hostile")
    args = {**build_files(tmp), "max_body_bytes": MAX_BODY, "trusted_proxies": ["127.0.0.1"]}
    with running_app(tmp, TOKEN, args) as (_args, client, url, _headers):
        warm = client.post("/search/image", content=_first_gallery_image(tmp))
        assert warm.status_code == 200, warm.text
        yield {"url": url, "client": client, "peak_mb": gallery_memory_mb()[1]}


def _first_gallery_image(tmp: Path) -> bytes:
    import pyarrow.parquet as pq

    return pq.read_table(tmp / "gallery").column("image")[0].as_py()


def _assert_one_line(response) -> str:
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str), response.text
    detail = body["detail"]
    assert "\n" not in detail and not LEAKS.search(detail), detail
    assert re.fullmatch(r"[0-9a-f-]{16,64}", response.headers["x-request-id"])
    return detail


def _by_name() -> dict:
    return {a[0]: a for a in attacks(MAX_BODY)}


@pytest.mark.ray
@pytest.mark.parametrize("name", list(EXPECTED))
def test_attack_gets_its_status_and_one_line(hostile, name) -> None:
    status, text, headers, _ = fire(hostile["url"], _by_name()[name])
    assert status == EXPECTED[name][0], text
    detail = json.loads(text)["detail"]
    assert "\n" not in detail and not LEAKS.search(detail), detail
    assert EXPECTED[name][1] in detail, detail
    assert re.fullmatch(r"[0-9a-f-]{16,64}", headers["x-request-id"])  # one id: Serve's
    assert headers["x-content-type-options"] == "nosniff"


def test_every_probe_attack_has_an_expectation() -> None:
    assert set(_by_name()) == set(EXPECTED)


@pytest.mark.ray
def test_scores_are_finite_with_the_largest_beta(hostile) -> None:
    got = hostile["client"].post("/search", json={"text": "a red circle", "k": 5,
                                                  "beta": 1000.0})
    assert got.status_code == 200, got.text
    hits = got.json()
    assert [h["stage"] for h in hits[:4]] == ["rerank"] * 4  # rerank_k 4 of the app
    for h in hits[:4]:
        assert h["score"] == pytest.approx(h["slow_score"] + 1000.0 * h["fast_score"], rel=1e-6)


@pytest.mark.ray
def test_session_cookie_holds_no_token(hostile) -> None:
    import httpx

    url = hostile["url"]
    login = httpx.post(url + "/login", json={"token": TOKEN})
    assert login.status_code == 204
    cookie = login.headers["set-cookie"]
    value = login.cookies["raycmr_session"]
    assert TOKEN not in cookie and hashlib.sha256(TOKEN.encode()).hexdigest() not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert "Max-Age=43200" in cookie  # serve.session_hours 12
    with httpx.Client(base_url=url, cookies={"raycmr_session": value}) as browser:
        assert browser.get("/").status_code == 200
        assert browser.post("/search", json={"text": "a circle", "k": 3}).status_code == 200
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    bad = httpx.get(url + "/stats", cookies={"raycmr_session": tampered})
    assert bad.status_code == 401
    assert _assert_one_line(bad) == "the session has expired or is not valid: sign in again"
    # behind a trusted TLS proxy (127.0.0.1 here) the cookie is Secure
    proxied = httpx.post(url + "/login", json={"token": TOKEN},
                         headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in proxied.headers["set-cookie"]


@pytest.mark.ray
def test_failed_logins_are_limited_per_client(hostile) -> None:
    """5 failures a minute from one client (X-Forwarded-For via the trusted proxy), then 429
    even for the right token; another client is not affected."""
    import httpx

    url = hostile["url"]

    def login(token: str, client: str):
        return httpx.post(url + "/login", json={"token": token},
                          headers={"X-Forwarded-For": client})

    assert [login("nope", "10.0.0.7").status_code for _ in range(5)] == [403] * 5
    blocked = login(TOKEN, "10.0.0.7")
    assert blocked.status_code == 429
    assert 55 <= int(blocked.headers["retry-after"]) <= 60
    assert _assert_one_line(blocked).startswith("too many failed sign-ins from this address")
    assert login(TOKEN, "10.0.0.8").status_code == 204


@pytest.mark.ray
def test_page_has_csp_matching_its_own_script(hostile) -> None:
    page = hostile["client"].get("/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", page.text, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert ' style="' not in page.text  # inline style attributes would need 'unsafe-inline'


@pytest.mark.ray
def test_cluster_check_sees_the_running_app(hostile) -> None:
    """The app's replicas hold 4.1 of the session cluster's 8 CPUs (encoder, retriever,
    slow scorer, gallery 1 each, ingress 0.1): other work sees them taken; a redeploy of the same
    app (``serving_demand``) counts them free."""
    from raycmr.resources import ClusterTooSmall, Demand, check_cluster_fits
    from raycmr.serve.app import APP_NAME

    other = Demand(bundles=[{"CPU": 1.0}] * 4, what="another app")
    with pytest.raises(ClusterTooSmall, match=r"it needs 4 CPU in total \(the cluster has 8, "
                                              r"4\.1 of them in use\)"):
        check_cluster_fits(other)
    check_cluster_fits(Demand(bundles=[{"CPU": 1.0}] * 4, replaces_serve_app=APP_NAME))


@pytest.mark.ray
def test_server_still_answers_with_bounded_memory(hostile) -> None:
    """Runs after the attacks (file order): searches still work and the Gallery replica's peak
    resident memory grew by less than 100 MB over all of them."""
    client = hostile["client"]
    assert client.get("/healthz").status_code == 200
    assert client.post("/search", json={"text": "a circle", "k": 3}).status_code == 200
    peak = gallery_memory_mb()[1]
    print(f"Gallery peak RSS: {hostile['peak_mb']:.0f} MB before the attacks, {peak:.0f} after")
    assert peak - hostile["peak_mb"] < 100


# ----------------------------------------------------------------------------- without Ray


def _guarded(route, max_body: int = 100):
    """A bare FastAPI app behind the Guard (no token), ``route`` at POST /x."""
    from fastapi import FastAPI

    from raycmr.serve.http import Guard

    api = FastAPI()
    api.add_middleware(Guard, plan=SimpleNamespace(token_sha256="", serve=SimpleNamespace(
        max_body_bytes=max_body)))
    api.post("/x")(route)
    return api


def test_unexpected_error_is_one_line_and_logged_under_its_request_id(caplog) -> None:
    import httpx

    async def boom():
        raise RuntimeError("secret detail at /srv/model.pt on 10.1.2.3")

    async def call():
        transport = httpx.ASGITransport(app=_guarded(boom), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/x")

    with caplog.at_level("ERROR", logger="ray.serve"):
        got = asyncio.run(call())
    assert got.status_code == 500
    rid = got.headers["x-request-id"]
    assert got.json() == {"detail": "internal error: the server log has its details under "
                                    f"request id {rid}"}
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


def test_chunked_body_over_the_limit_gets_413_without_the_route() -> None:
    import httpx

    called = []

    async def route():
        called.append(1)

    async def call(body):
        transport = httpx.ASGITransport(app=_guarded(route, max_body=100))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/x", content=body)

    async def chunks():
        for _ in range(11):
            yield b"0123456789"

    got = asyncio.run(call(chunks()))
    assert got.status_code == 413 and not called
    assert asyncio.run(call(b"x" * 100)).status_code == 200 and called == [1]


def test_sessions_expire_and_are_bound_to_the_key() -> None:
    from raycmr.serve.sessions import FailedLogins, is_https, new_session, session_valid

    cookie = new_session("k1", 60, now=1000)
    assert session_valid("k1", cookie, now=1059) and not session_valid("k1", cookie, now=1060)
    assert not session_valid("k2", cookie, now=1000)
    assert not session_valid("k1", "", now=1000) and not session_valid("", cookie, now=1000)
    scope = {"client": ("10.9.9.9", 1), "scheme": "http",
             "headers": [(b"x-forwarded-proto", b"https")]}
    assert not is_https(scope, False, ["127.0.0.1"])  # an untrusted peer's header is ignored
    assert is_https(scope, False, ["10.9.9.9"]) and is_https(scope, True, [])
    limit = FailedLogins(2, window_s=60)
    limit.failed("a", now=0)
    limit.failed("a", now=10)
    assert limit.wait_s("a", now=30) == 30 and limit.wait_s("a", now=60) == 0
    assert limit.wait_s("b", now=30) == 0


def test_non_finite_scores_are_refused() -> None:
    from raycmr.serve.http import check_scores

    check_scores([{"id": "a", "score": 1.0, "slow_score": None}], ("score", "slow_score"))
    with pytest.raises(ValueError, match="non-finite score inf for gallery id 'a'"):
        check_scores([{"id": "a", "score": float("inf")}], ("score",))
