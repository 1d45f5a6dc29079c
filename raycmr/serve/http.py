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
* ``POST /search/image?k=10`` (body: a JPEG/PNG file) -> the closest gallery captions, when the
  gallery's shards hold images and captions.
* ``GET /`` the search page; ``GET /image/{id}`` a gallery image; ``POST /login``
  ``{"token": ...}`` sets the page's cookie.
* ``GET /healthz`` (never behind the token) -> gallery size, index kind, query input, the slow
  stage's defaults.
* ``GET /stats`` -> milliseconds per stage (``encode``, ``retrieve``, their sum ``fast``,
  ``rerank``, ``total``: mean, p50, p95 over one Ingress replica's recent searches) and batch
  sizes seen by one replica of each batched deployment.
* ``/docs``, ``/redoc``, ``/openapi.json`` only with ``docs: true``.

With ``auth: token`` every route but ``/healthz`` and ``/login`` needs ``Authorization: Bearer
TOKEN`` or the cookie ``/login`` sets (HttpOnly, SameSite=Strict): none -> 401, a wrong one ->
403. Bodies over ``max_body_bytes`` get 413, text queries over ``max_query_chars`` 422.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model and parameter
# types from the route functions' annotations at runtime.
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from raycmr.serve.plan import ServePlan

COOKIE = "raycmr_token"
OPEN_PATHS = ("/healthz", "/login")
PAGE = Path(__file__).with_name("page.html")


class SearchRequest(BaseModel):
    """Body of ``POST /search``: exactly one of ``text`` and ``text_feat``."""

    text: str | None = None
    text_feat: list[float] | None = None
    k: int = Field(10, ge=1)
    rerank: bool = True
    rerank_k: int | None = Field(None, ge=0)  # None: the service's serve.rerank_k
    beta: float | None = None  # None: the service's serve.beta


class LoginRequest(BaseModel):
    """Body of ``POST /login``."""

    token: str


def token_matches(token: str, digest: str) -> bool:
    """Constant-time comparison of a presented token with the stored SHA-256 digest."""
    return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), digest)


def render_page(plan: ServePlan, login: bool) -> str:
    """The search page (or its login form) with what it needs to know inlined."""
    info = {"login": login, "query_input": plan.query_input, "top_k": plan.top_k,
            "rerank": bool(plan.slow_checkpoint), "rerank_k": plan.rerank_k, "gallery": plan.count,
            "images": plan.has_images}
    return PAGE.read_text().replace("__INFO__", json.dumps(info).replace("<", "\\u003c"))


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the bearer-token check and the request body limit."""

    def __init__(self, app, plan: ServePlan):
        self.app, self.plan = app, plan

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if self.plan.token_sha256 and path not in OPEN_PATHS:
            denied = self._check(request, path)
            if denied is not None:
                return await denied(scope, receive, send)
        limit = self.plan.serve.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await _too_large(limit)(scope, receive, send)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(limit)(scope, receive, send)

    def _check(self, request: Request, path: str) -> Response | None:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = token or request.cookies.get(COOKIE, "")
        if token and token_matches(token, self.plan.token_sha256):
            return None
        if path == "/" and request.method == "GET":  # the page: its login form
            return HTMLResponse(render_page(self.plan, login=True),
                                status_code=403 if token else 401)
        if not token:
            return JSONResponse({"detail": "this service needs a token: send 'Authorization: "
                                           "Bearer TOKEN'"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse({"detail": "wrong token"}, status_code=403)


def _too_large(limit: int) -> Response:
    return JSONResponse({"detail": f"request body is larger than this service's limit of "
                                   f"{limit} bytes (serve.max_body_bytes)"}, status_code=413)


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
        if not np.isfinite(np.asarray(req.text_feat, dtype=np.float64)).all():
            raise HTTPException(400, "'text_feat' holds NaN or inf")
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
    if not np.isfinite(beta):
        raise HTTPException(400, "'beta' must be a finite number")
    return (rerank_k if req.rerank else 0), float(beta)


def _server_timing(times: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={1000 * s:.2f}" for name, s in times.items())


def make_api(ingress, plan: ServePlan) -> FastAPI:
    """The FastAPI app of one Ingress replica (built at replica start, see ``Ingress``)."""
    docs = plan.serve.docs
    api = FastAPI(title="raycmr retrieval", description=__doc__,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    api.add_middleware(Guard, plan=plan)

    @api.post("/search")
    async def search(req: SearchRequest, response: Response) -> list[dict[str, Any]]:
        """Top ``k`` gallery ids for a query, reranked unless ``rerank`` is false."""
        query = check_query(plan, req)
        rerank_k, beta = check_rerank(plan, req)
        results, times = await ingress.search(query, req.k, rerank_k, beta)
        response.headers["Server-Timing"] = _server_timing(times)
        return results

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness plus what this service answers with."""
        return {"status": "ok", "gallery": plan.count, "index_kind": plan.index_kind,
                "query_input": plan.query_input, "top_k": plan.top_k,
                "rerank_k": plan.rerank_k, "max_rerank_k": plan.max_rerank_k,
                "beta": plan.beta if plan.slow_checkpoint else 0.0,
                "reranker": ingress.reranker is not None}

    @api.get("/stats")
    async def stats() -> dict[str, Any]:
        """Milliseconds per stage and batch-size summaries (see the module docstring)."""
        return await ingress.stats()

    @api.get("/", response_class=HTMLResponse)
    async def page() -> str:
        """The search page."""
        return render_page(plan, login=False)

    @api.post("/login")
    async def login(req: LoginRequest, request: Request) -> Response:
        """Check a token and keep it in an HttpOnly, SameSite=Strict cookie for the page."""
        if not plan.token_sha256:
            return Response(status_code=204)
        if not token_matches(req.token.strip(), plan.token_sha256):
            raise HTTPException(403, "wrong token")
        response = Response(status_code=204)
        response.set_cookie(COOKIE, req.token.strip(), httponly=True, samesite="strict",
                            path=(request.scope.get("root_path") or "") + "/",
                            secure=request.url.scheme == "https")
        return response

    @api.get("/image/{image_id:path}")
    async def image(image_id: str) -> Response:
        """A gallery image, as stored in the gallery's shards."""
        from raycmr.serve.gallery import image_type

        if ingress.gallery is None:
            raise HTTPException(404, "this gallery's shards hold feature vectors, not images")
        data = await ingress.gallery.image.remote(image_id)
        if data is None:
            raise HTTPException(404, f"no image '{image_id}' in the gallery")
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
            raise HTTPException(400, "post an image file (JPEG or PNG) as the request body")
        try:
            return await ingress.gallery.captions_for.remote(data, k)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    return api
