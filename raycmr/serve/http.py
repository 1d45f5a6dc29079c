"""The HTTP surface of the retrieval service: routes, the bearer-token check and size limits.

Routes (under the application's route prefix):

* ``POST /search`` ``{"text": "...", "k": 10}`` (or ``"text_feat": [...]`` for models whose text
  tower takes feature vectors) -> a JSON list of results, best first: ``id``, ``score`` (the
  final score), ``stage``, ``fast_score`` f(x)^T g(y), ``slow_score`` h(x, y) (null when not
  re-ranked) and ``fast_rank``. With a slow stage the fast top ``rerank_k`` are re-ranked by
  ``score = h + beta * fast`` (``stage: "rerank"``), the rest keep ``score = fast``
  (``"retrieve"``). ``"rerank_k"`` (up to the service's ``max_rerank_k``) and ``"beta"``
  override the service's defaults per request; ``"rerank": false`` skips the slow stage.
  The ``Server-Timing`` header holds each stage's milliseconds.
* ``POST /search/image?k=10`` (body: a JPEG, PNG or WebP file) -> the closest gallery captions,
  when the gallery's shards hold images and captions. Format and size are checked from the
  image's header before any decode (:func:`raycmr.data.transforms.check_image_header`): another
  format gets 415, too many pixels 413, undecodable bytes or a sliver 422, each naming the limit.
* ``GET /`` the search page; ``GET /image/{id}`` a gallery image; ``POST /login``
  ``{"token": ...}`` sets the page's session cookie (:mod:`raycmr.serve.sessions`).
* ``GET /healthz`` (never behind the token) -> gallery size, index kind, query input, whether
  there is a slow stage (``slow``) and its defaults.
* ``GET /stats`` -> milliseconds per stage (``encode``, ``retrieve``, their sum ``fast``,
  ``rerank``, ``total``: mean, p50, p95 over the app's recent searches, whichever Ingress
  replica ran them) and batch sizes seen by one replica of each batched deployment
  (``encoder``, ``retriever``, ``slow``).
* ``/docs``, ``/redoc``, ``/openapi.json`` only with ``docs: true``.

With ``auth: token`` every route but ``/healthz`` and ``/login`` needs ``Authorization: Bearer
TOKEN`` or the session cookie ``/login`` sets (HttpOnly, SameSite=Strict, Secure over https):
none -> 401, a wrong one -> 403; ``serve.login_failures_per_minute`` failed logins from one
client -> 429. Bodies over ``max_body_bytes`` get 413 (chunked or not), text queries over
``max_query_chars`` 422; request bodies with unknown fields or out-of-range numbers 422 naming
the field.

Every error body is ``{"detail": "<one line naming the problem>"}``: never a traceback, path or
address. Every response carries ``X-Request-Id``; an unexpected error answers 500 with that id,
and the server log holds its details under it. The page has a Content-Security-Policy (its own
script and style only), and every response ``X-Frame-Options: DENY`` and
``X-Content-Type-Options: nosniff``.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model and parameter
# types from the route functions' annotations at runtime.
import base64
import hashlib
import hmac
import json
import logging
import math
import re
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from raycmr.config import MAX_BETA
from raycmr.serve import sessions
from raycmr.serve.plan import ServePlan

OPEN_PATHS = ("/healthz", "/login")
PAGE = Path(__file__).with_name("page.html")
MAX_K = 10_000  # k and rerank_k; the service's own top_k / max_rerank_k cap them further
MAX_FEATURE = 1e9  # |text_feat| values: float32 products stay finite
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
logger = logging.getLogger("ray.serve")

Feature = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_FEATURE, le=MAX_FEATURE)]


class SearchRequest(BaseModel):
    """Body of ``POST /search``: exactly one of ``text`` and ``text_feat``; unknown fields and
    out-of-range numbers are refused (422)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    text_feat: list[Feature] | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: bool = True
    rerank_k: int | None = Field(None, ge=0, le=MAX_K)  # None: the service's serve.rerank_k
    beta: float | None = Field(None, ge=-MAX_BETA, le=MAX_BETA,
                               allow_inf_nan=False)  # None: the service's serve.beta


class LoginRequest(BaseModel):
    """Body of ``POST /login``."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=1000)


def token_matches(token: str, digest: str) -> bool:
    """Constant-time comparison of a presented token with the stored SHA-256 digest."""
    return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), digest)


def render_page(plan: ServePlan, login: bool) -> str:
    """The search page (or its login form) with what it needs to know inlined."""
    info = {"login": login, "query_input": plan.query_input, "top_k": plan.top_k,
            "rerank": bool(plan.slow_checkpoint), "rerank_k": plan.rerank_k, "gallery": plan.count,
            "images": plan.has_images}
    return PAGE.read_text().replace("__INFO__", json.dumps(info).replace("<", "\\u003c"))


def _csp_hash(html: str, tag: str) -> str:
    found = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    digest = hashlib.sha256(found.group(1).encode() if found else b"").digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


def page_response(plan: ServePlan, login: bool, status_code: int = 200) -> HTMLResponse:
    """The page with a Content-Security-Policy that allows its own inline script and style (by
    hash) and requests to this service only."""
    html = render_page(plan, login)
    csp = (f"default-src 'none'; script-src {_csp_hash(html, 'script')}; "
           f"style-src {_csp_hash(html, 'style')}; img-src 'self'; connect-src 'self'; "
           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    return HTMLResponse(html, status_code=status_code,
                        headers={"Content-Security-Policy": csp})


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response: ``{"detail": one line}``."""
    return JSONResponse({"detail": " ".join(detail.split())}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]], fields: list[str] | None = None) -> str:
    """One line naming the first problem pydantic found in a request (and how many more);
    ``fields``: the request body's known fields, named when an unknown one was sent."""
    first = errors[0] if errors else {}
    field = ".".join(str(p) for p in first.get("loc", ())[1:])
    kind, msg = first.get("type", ""), str(first.get("msg", "invalid request"))
    if kind == "json_invalid":
        line = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', msg)})"
    elif kind == "extra_forbidden":
        known = f" (known: {', '.join(fields)})" if fields else ""
        line = f"unknown field '{field}'{known}"
    elif field:
        line = f"'{field}': {msg}"
    else:
        line = f"the request body: {msg}"
    more = len(errors) - 1
    return line + (f" (and {more} more problem{'s' * (more > 1)})" if more > 0 else "")


class Guard:
    """ASGI middleware: request id, security headers, the body limit, the token or session
    check, and a one-line 500 for anything unexpected (details logged under the request id)."""

    def __init__(self, app, plan: ServePlan):
        self.app, self.plan = app, plan

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Serve's proxy gives every request an id (the client's X-Request-Id or a new one) and
        # returns it in the response's X-Request-Id; its replica logs carry it too.
        served_id = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = served_id[:64] or uuid.uuid4().hex
        extra = SECURITY_HEADERS + ([] if served_id else [(b"x-request-id", rid.encode())])
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            denied = self._check(Request(scope), scope)
            if denied is not None:
                return await denied(scope, receive, send_with_headers)
            body = await _read_body(scope, receive, self.plan.serve.max_body_bytes)
            if body is None:
                return await _too_large(self.plan.serve.max_body_bytes)(
                    scope, receive, send_with_headers)
            await self.app(scope, _replay(body, receive), send_with_headers)
        except Exception:
            logger.exception("request %s (%s %s) failed", rid, scope.get("method"),
                             scope.get("path"))
            if not started:
                await error(500, f"internal error: the server log has its details under "
                                 f"request id {rid}")(scope, receive, send_with_headers)

    def _check(self, request: Request, scope) -> Response | None:
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if not self.plan.token_sha256 or path in OPEN_PATHS:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if token and token_matches(token, self.plan.token_sha256):
            return None
        session = request.cookies.get(sessions.COOKIE, "")
        if not token and session and sessions.session_valid(self.plan.session_key, session):
            return None
        if path == "/" and request.method == "GET":  # the page: its login form
            return page_response(self.plan, login=True, status_code=403 if token else 401)
        if token:
            return error(403, "wrong token")
        if session:
            return error(401, "the session has expired or is not valid: sign in again",
                         {"WWW-Authenticate": "Bearer"})
        return error(401, "this service needs a token: send 'Authorization: Bearer TOKEN'",
                     {"WWW-Authenticate": "Bearer"})


async def _read_body(scope, receive, limit: int) -> bytes | None:
    """The whole request body (at most ``limit`` bytes, chunked or not), or None when over."""
    length = dict(scope.get("headers", [])).get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body read by the Guard, then waits on the client."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _too_large(limit: int) -> Response:
    return error(413, f"request body is larger than this service's limit of {limit} bytes "
                      "(serve.max_body_bytes)")


def check_query(plan: ServePlan, req: SearchRequest) -> dict[str, Any]:
    """The query dict the encoder takes, or an HTTPException naming what is wrong."""
    if (req.text is None) == (req.text_feat is None):
        raise HTTPException(400, "give exactly one of 'text' and 'text_feat'")
    if req.text is not None and len(req.text) > plan.serve.max_query_chars:
        raise HTTPException(422, f"'text' has {len(req.text)} characters; this service takes at "
                                 f"most {plan.serve.max_query_chars} (serve.max_query_chars)")
    if req.k > plan.top_k:
        raise HTTPException(400, f"k={req.k} is more than this service's top_k={plan.top_k}")
    if plan.query_input == "text_feat":
        if req.text_feat is None:
            raise HTTPException(400, f"this model's text tower takes feature vectors: send "
                                     f"'text_feat' (a list of {plan.text_dim} numbers)")
        if len(req.text_feat) != plan.text_dim:
            raise HTTPException(400, f"'text_feat' has {len(req.text_feat)} values; this "
                                     f"model takes {plan.text_dim}")
        return {"text_feat": [float(v) for v in req.text_feat]}
    if req.text is None:
        raise HTTPException(400, "this model embeds text: send 'text' (a string)")
    if not req.text.strip():
        raise HTTPException(400, "'text' is empty")
    return {"text": req.text}


def check_rerank(plan: ServePlan, req: SearchRequest) -> tuple[int, float]:
    """``(rerank_k, beta)`` of a request: the service's defaults or the request's own, or an
    HTTPException naming the cap."""
    rerank_k = plan.rerank_k if req.rerank_k is None else req.rerank_k
    beta = plan.beta if req.beta is None else req.beta
    if not plan.slow_checkpoint:
        if req.rerank_k or req.beta is not None:
            raise HTTPException(400, "this service has no slow stage: 'rerank_k' and 'beta' "
                                     "need an index built with `raycmr index --slow SLOW`")
        return 0, 0.0
    if rerank_k > plan.max_rerank_k:
        raise HTTPException(400, f"rerank_k={rerank_k} is more than this service's "
                                 f"max_rerank_k={plan.max_rerank_k} (serve.max_rerank_k, at "
                                 "most serve.top_k)")
    return (rerank_k if req.rerank else 0), float(beta)


def check_scores(results: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Raise (-> 500, logged under the request id) when a result holds a NaN or inf score:
    JSON has no such number, and clients would get ``null``."""
    for hit in results:
        for key in keys:
            value = hit.get(key)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"non-finite {key} {value} for gallery id {hit.get('id')!r}")


def downstream_cause(exc: BaseException) -> BaseException:
    """The exception a deployment raised, unwrapped from Ray's ``RayTaskError``."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def _server_timing(times: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={1000 * s:.2f}" for name, s in times.items())


def make_api(ingress, plan: ServePlan) -> FastAPI:
    """The FastAPI app of one Ingress replica (built at replica start, see ``Ingress``)."""
    from raycmr.data.transforms import ImageRejected

    docs = plan.serve.docs
    api = FastAPI(title="raycmr retrieval", description=__doc__,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    api.add_middleware(Guard, plan=plan)
    failed_logins = sessions.FailedLogins(plan.serve.login_failures_per_minute)
    proxies = list(plan.serve.trusted_proxies)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        route = getattr(request.scope.get("route"), "path", "")
        model = {"/search": SearchRequest, "/login": LoginRequest}.get(route)
        return error(422, validation_message(list(exc.errors()),
                                             list(model.model_fields) if model else None))

    @api.post("/search")
    async def search(req: SearchRequest, response: Response) -> list[dict[str, Any]]:
        """Top ``k`` gallery ids for a query, reranked unless ``rerank`` is false."""
        query = check_query(plan, req)
        rerank_k, beta = check_rerank(plan, req)
        results, times = await ingress.search(query, req.k, rerank_k, beta)
        check_scores(results, ("score", "fast_score", "slow_score"))
        response.headers["Server-Timing"] = _server_timing(times)
        return results

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness plus what this service answers with."""
        return {"status": "ok", "gallery": plan.count, "index_kind": plan.index_kind,
                "query_input": plan.query_input, "top_k": plan.top_k,
                "rerank_k": plan.rerank_k, "max_rerank_k": plan.max_rerank_k,
                "beta": plan.beta if plan.slow_checkpoint else 0.0,
                "slow": ingress.slow is not None}

    @api.get("/stats")
    async def stats() -> dict[str, Any]:
        """Milliseconds per stage and batch-size summaries (see the module docstring)."""
        return await ingress.stats()

    @api.get("/", response_class=HTMLResponse)
    async def page() -> Response:
        """The search page."""
        return page_response(plan, login=False)

    @api.post("/login")
    async def login(req: LoginRequest, request: Request) -> Response:
        """Check a token and set a session cookie (HttpOnly, SameSite=Strict, Secure over
        https) for the page; too many failures from one client -> 429."""
        if not plan.token_sha256:
            return Response(status_code=204)
        client = sessions.client_address(request.scope, proxies)
        wait = failed_logins.wait_s(client)
        if wait > 0:
            return error(429, f"too many failed sign-ins from this address: try again in "
                              f"{math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))})
        if not token_matches(req.token.strip(), plan.token_sha256):
            failed_logins.failed(client)
            raise HTTPException(403, "wrong token")
        lifetime = plan.serve.session_hours * 3600
        response = Response(status_code=204)
        response.set_cookie(sessions.COOKIE, sessions.new_session(plan.session_key, lifetime),
                            max_age=int(lifetime), httponly=True, samesite="strict",
                            path=(request.scope.get("root_path") or "") + "/",
                            secure=sessions.is_https(request.scope, plan.serve.public_https,
                                                     proxies))
        return response

    @api.get("/image/{image_id:path}")
    async def image(image_id: str) -> Response:
        """A gallery image, as stored in the gallery's shards."""
        from raycmr.serve.gallery import image_type

        if ingress.gallery is None:
            raise HTTPException(404, "this gallery's shards hold feature vectors, not images")
        data = await ingress.gallery.image.remote(image_id)
        if data is None:
            raise HTTPException(404, f"no image '{image_id[:100]}' in the gallery")
        return Response(data, media_type=image_type(data),
                        headers={"Cache-Control": "private, max-age=3600"})

    @api.post("/search/image")
    async def search_image(request: Request, k: int = Query(10, ge=1, le=100)
                           ) -> list[dict[str, Any]]:
        """Image -> text: the ``k`` gallery captions closest to the posted image file."""
        if ingress.gallery is None:
            raise HTTPException(404, "image -> text search needs a gallery of images with "
                                     "captions; this one holds feature vectors")
        data = await request.body()
        if not data:
            raise HTTPException(400, "post an image file (JPEG, PNG or WebP) as the request body")
        try:
            results = await ingress.gallery.captions_for.remote(data, k)
        except Exception as exc:
            cause = downstream_cause(exc)
            if not isinstance(cause, ImageRejected):
                raise
            logger.info("request %s: upload refused (%s)", request.state.request_id, cause)
            raise HTTPException(cause.status, str(cause)) from None
        check_scores(results, ("score",))
        return results

    return api
