"""The HTTP edge: what every route of the API shares, kept out of the service wiring (service.py).

- errors: the one table from domain errors to HTTP statuses, and their JSON bodies;
- EdgeGuard: request bodies bounded while they stream, security headers on every answer;
- who may do what: API keys, the keyless loopback mode, per-client limits of the expensive routes;
- codecs: uploads and .npy pixel bodies, checked before anything is allocated;
- shaping: hits and cards with their image URLs, the status page, blobs with their cache headers.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import anyio
import numpy as np
import psutil
from fastapi import Depends, FastAPI, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bento.adapters.storage import Kind
from bento.core.config import Settings, get_settings
from bento.core.errors import (
    BackendUnavailable,
    Conflict,
    Forbidden,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelMismatch,
    ModelUnavailable,
    NotFound,
    RateLimited,
    SearchError,
    Unauthenticated,
    UnsupportedImageFormat,
    UnsupportedMediaType,
    UrlFetchFailed,
)
from bento.core.metrics import exposition, leaf_routes
from bento.domain.catalog import Added, Catalog, Embedding, SearchResult
from bento.domain.schemas import (
    ErrorResponse,
    GalleryPage,
    ImageCard,
    ImageMetadata,
    IndexSpec,
    InsertResponse,
    Limits,
    ModelDescription,
    SearchHit,
    SearchResponse,
    StatusResponse,
)
from bento.http.auth import KeyTable, Principal, Scope, is_loopback, presented_key
from models.backbones import Role
from models.imaging import check_size
from models.pipeline import MAX_PIXELS_BYTES, check_pixel_shape

logger = logging.getLogger("ris.service")
P = ParamSpec("P")
T = TypeVar("T")


# --- errors -------------------------------------------------------------------------------------------

# The one table from domain errors to HTTP statuses (the most specific class wins).
HTTP_STATUS: dict[type[SearchError], int] = {
    InvalidRequest: 400,
    UrlFetchFailed: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    ModelMismatch: 409,
    ImageTooLarge: 413,
    UnsupportedImageFormat: 415,
    UnsupportedMediaType: 415,
    InvalidImage: 422,
    RateLimited: 429,
    SearchError: 500,
    ModelUnavailable: 503,
    BackendUnavailable: 503,
}
# What a client told "503, try later" should wait (a dropped dependency, a busy decoder, an outage).
RETRY_AFTER_S = 5


def http_status(error: SearchError) -> int:
    return next(HTTP_STATUS[cls] for cls in type(error).__mro__ if cls in HTTP_STATUS)


# What a caller without the admin scope reads of a server-side failure (the full message is logged).
PUBLIC_DETAIL: dict[int, str] = {
    500: "The service failed to answer this request; its operators can read why in its logs.",
    503: "A backend of the service (the model, the vector database or the image store) is unavailable; try again shortly.",
}


def error_response(error: SearchError, reveal: bool = True) -> JSONResponse:
    """The JSON answer for a domain error. ``reveal``: whether the caller may read a server-side failure's
    own message (operators may; to others it would name hosts, paths and causes)."""
    status = http_status(error)
    headers: dict[str, str] = {}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(error.retry_after_s)
    elif status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="reverse-image-search"'
    detail = error.message if reveal or error.public or status < 500 else PUBLIC_DETAIL.get(status, PUBLIC_DETAIL[500])
    return JSONResponse(ErrorResponse(error=error.code, detail=detail).model_dump(), status_code=status, headers=headers)


# --- request bodies and response headers, for every route (a pure ASGI middleware: it sees the body as it
# streams, before FastAPI spools a multipart upload or reads a JSON body) --------------------------------

JSON_BODY_LIMIT = 64 * 1024
MULTIPART_OVERHEAD = 64 * 1024
EMBED_BODY_LIMIT = MAX_PIXELS_BYTES + 4096  # the largest .npy /api/embed accepts


def body_limit(method: str, path: str, settings: Settings) -> tuple[int, ErrorResponse]:
    """The most bytes a request to this route may send, and the answer when it sends more (413)."""
    if method == "POST" and path in ("/api/search", "/api/images"):
        limit = settings.limits.max_upload_bytes + MULTIPART_OVERHEAD
        detail = f"The upload is over the {settings.limits.max_upload_bytes}-byte image limit."
        return limit, ErrorResponse(error=ImageTooLarge.code, detail=detail)
    limit = EMBED_BODY_LIMIT if method == "POST" and path == "/api/embed" else JSON_BODY_LIMIT
    return limit, ErrorResponse(error="request_too_large", detail=f"The request body is over this route's {limit}-byte limit.")


def security_headers(settings: Settings) -> list[tuple[bytes, bytes]]:
    """Headers on every answer: a CSP that allows only the page's own script and style (no inline code),
    images from here, blobs (local previews), https and the S3 host of presigned URLs; no framing."""
    image_sources = ["'self'", "data:", "blob:", "https:"]
    if settings.store.backend == "s3":
        public = settings.s3.public_endpoint or f"{'https' if settings.s3.secure else 'http'}://{settings.s3.endpoint}"
        image_sources.append(public)
    csp = (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src {' '.join(image_sources)}; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class _BodyTooLarge(Exception):
    pass


class EdgeGuard:
    """Refuses a request body over its route's limit (413) whether or not it declares a Content-Length,
    while it streams; adds the security headers to every answer."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.headers = security_headers(settings)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refusal = body_limit(scope["method"], scope["path"], self.settings)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(send, refusal)
            return
        received, exceeded, started = 0, False, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if exceeded:  # whatever the app made of the interrupted body, the answer is 413
                return
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._too_large(send, refusal)

    async def _too_large(self, send: Callable[[dict[str, Any]], Awaitable[None]], refusal: ErrorResponse) -> None:
        payload = refusal.model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close"), *self.headers]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


# --- who may do what ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def key_table() -> KeyTable:
    auth = get_settings().auth
    return KeyTable.from_settings(auth.keys, auth.keys_file, auth.anonymous_scopes)


@functools.lru_cache(maxsize=1)
def listening_on_loopback_only() -> bool:
    """Whether every socket this API worker listens on is bound to a loopback address.

    BentoML hands its workers an already bound socket, and the ASGI scope names only the address a
    client reached, so the answer comes from the process's own listening sockets. When they cannot be
    read, the answer is no (the safe side: no writes without keys)."""
    try:
        listening = [c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        logger.warning("cannot read this process's listening sockets; treating the service as exposed")
        return False
    return bool(listening) and all(is_loopback(address.ip) for address in listening)


LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def refuse_other_sites(request: Request, scope: Scope) -> None:
    """The keyless loopback mode is open to this machine's own users only: not to a web page that a DNS
    rebinding points at 127.0.0.1 (its Host is another name), and not to another site's form posting
    across origins (no CORS preflight protects a multipart POST)."""
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
    if host not in LOCAL_NAMES:
        raise Forbidden(f"With no API keys this service answers only to localhost, not to the host name {host!r}.")
    origin = urlsplit(request.headers.get("origin", "")).hostname
    cross_site = request.headers.get("sec-fetch-site") == "cross-site" or (origin is not None and origin not in LOCAL_NAMES)
    if scope != "search" and cross_site:
        raise Forbidden("With no API keys, writes from another site's pages are refused.")


def allowed(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A route dependency: the caller's principal, when it may act in ``scope`` (401/403 otherwise)."""

    async def check(
        request: Request,
        authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
        x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> Principal:
        loopback = listening_on_loopback_only()
        table = key_table()
        if loopback and not table.configured:
            refuse_other_sites(request, scope)
        principal = table.identify(presented_key(authorization, x_api_key), loopback)
        table.require(principal, scope, loopback)
        request.state.principal = principal  # the error handler shows failures' details to admins only
        return principal

    return check


Searcher = Annotated[Principal, Depends(allowed("search"))]
Writer = Annotated[Principal, Depends(allowed("write"))]
Admin = Annotated[Principal, Depends(allowed("admin"))]


class ClientLimits:
    """Per-client limits of the expensive routes (a moving window per minute, in this worker's memory).
    Admin principals (the operators' tools, e.g. the remote ingest) are not limited."""

    def __init__(self, per_minute: int) -> None:
        self.item = RateLimitItemPerMinute(per_minute) if per_minute > 0 else None
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def charge(self, request: Request, principal: Principal, route: str) -> None:
        if self.item is None or "admin" in principal.scopes:
            return
        client = f"key:{principal.name}" if principal.name else f"ip:{request.client.host if request.client else '?'}"
        if not self.limiter.hit(self.item, route, client):
            reset = self.limiter.get_window_stats(self.item, route, client).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise RateLimited(f"Too many {route} requests; at most {self.item.amount} a minute per client.", wait)


# --- codecs and threads -------------------------------------------------------------------------


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """Read an upload (its body already bounded by EdgeGuard) and check its size."""
    data = await upload.read(max_bytes + 1)
    check_size(len(data), max_bytes)
    return data


def read_npy(raw: bytes, content_type: str, sides: Sequence[int]) -> np.ndarray:
    """A .npy of uint8 pixels at one of the recipe's input ``sides``, checked from its header before
    anything is allocated (no pickles)."""
    if content_type.split(";")[0].strip().lower() not in ("application/x-npy", "application/octet-stream"):
        raise UnsupportedMediaType("POST /api/embed takes a .npy body (Content-Type: application/x-npy).")
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(stream, max_header_size=1024)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InvalidRequest(f"The body must be a .npy array: {exc}") from exc
    if fortran_order:
        raise InvalidRequest("The .npy array must be in C order.")
    check_pixel_shape(dtype, shape, sides, at_least=1)
    if len(raw) - stream.tell() != math.prod(shape):
        raise InvalidRequest(f"The .npy header says {shape} but the body holds {len(raw) - stream.tell()} bytes of pixels.")
    return np.frombuffer(raw, dtype=np.uint8, offset=stream.tell()).reshape(shape)


def while_not_ready(body: Any, ready: bool) -> JSONResponse:
    """A result computed in the background: 200 once it is ready, 202 (with its state) until then."""
    return JSONResponse(body.model_dump(), status_code=200 if ready else 202)


def install_error_handlers(app: FastAPI) -> None:
    """Every error in the API's JSON shape ``{error, detail}``: domain errors by HTTP_STATUS, routing and
    validation errors by FastAPI's."""
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(SearchError, _domain_error)  # type: ignore[arg-type]


def add_last_routes(app: FastAPI) -> None:
    """/metrics and the catch-all route; called after every other route (the catch-all must be last)."""
    app.add_api_route("/metrics", _metrics_page, methods=["GET"], include_in_schema=False)

    async def no_such_route(request: Request, unknown: str) -> JSONResponse:
        """Last route: BentoML answers paths no route of ours takes with a plain-text 404; this keeps every
        answer in the API's JSON error shape (a known path with another method is a 405)."""
        known_path = any(
            not is_fallback(route) and route.matches(request.scope)[0] == Match.PARTIAL
            for route in leaf_routes(app.router.routes)
            if isinstance(route, APIRoute)
        )
        status, code = (405, "method_not_allowed") if known_path else (404, "not_found")
        detail = f"{request.method} is not allowed here" if known_path else f"No route /{unknown}"
        return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(), status_code=status)

    no_such_route.fallback = True  # type: ignore[attr-defined]
    app.add_api_route(
        "/{unknown:path}", no_such_route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        include_in_schema=False,
    )


def is_fallback(route: Any) -> bool:
    """The catch-all route (its requests are counted as unmatched, not as a route of theirs)."""
    return getattr(getattr(route, "endpoint", None), "fallback", False)


def _metrics_page() -> Response:
    """Prometheus text of every process of this service: the product's series (bento/core/metrics.py) and
    BentoML's of the other services here (vector-search; the embedder too inside one `bentoml serve`)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the API's own error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        ErrorResponse(error=code, detail=str(exc.detail)).model_dump(), status_code=exc.status_code, headers=exc.headers
    )


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse(ErrorResponse(error="validation_error", detail=problems).model_dump(), status_code=422)


async def _domain_error(request: Request, exc: SearchError) -> JSONResponse:
    principal = getattr(request.state, "principal", None)
    response = error_response(exc, reveal=principal is not None and "admin" in principal.scopes)
    if response.status_code >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    return response


# --- shaping: what the routes answer --------------------------------------------------------------


async def api_ready(catalog: Catalog) -> bool:
    """The API's own readiness: the vector search service and the image store answer (the embedder is left
    out: without one, upload searches answer 503 and everything else keeps working)."""
    try:
        await in_thread(catalog.vectors.ping)
        await in_thread(catalog.store.ping)
    except SearchError as exc:
        logger.warning("not ready: %s", exc.message)
        return False
    return True


def card(catalog: Catalog, meta: ImageMetadata) -> dict[str, Any]:
    """An image as the API shows it: its metadata and where to fetch it (presigned where the store allows)."""
    return {
        **meta.model_dump(),
        "image_url": catalog.direct_url(meta.id, "original") or f"/api/images/{meta.id}",
        "thumbnail_url": catalog.direct_url(meta.id, "thumbnail") or f"/api/images/{meta.id}/thumbnail",
    }


async def gallery_response(catalog: Catalog, offset: int, limit: int, label: str | None) -> JSONResponse:
    """A page of the collection: 202 with state "scanning" while the listing is first read."""
    page = await in_thread(catalog.browse, offset, limit, label)
    body = GalleryPage(
        state=page.state, total=page.total, offset=offset, limit=limit, label=label,
        images=[ImageCard(**card(catalog, meta)) for meta in page.images],
    )
    return while_not_ready(body, page.state == "ready")


def insert_response(added: Added) -> JSONResponse:
    """201 for a new image, 200 for bytes already stored (nothing changed)."""
    message = "Added." if added.created else "Already present; nothing changed."
    body = InsertResponse(id=added.id, created=added.created, message=message, image=added.image)
    return JSONResponse(body.model_dump(), status_code=201 if added.created else 200)


def search_response(catalog: Catalog, result: SearchResult) -> SearchResponse:
    hits = [SearchHit(**card(catalog, hit.image), score=round(hit.score, 6), verdict=hit.verdict, match=hit.match) for hit in result.hits]
    return SearchResponse(**result.model_dump(exclude={"hits"}), hits=hits)


async def blob_response(catalog: Catalog, request: Request, image_id: str, kind: Kind) -> Response:
    """An original or thumbnail, streamed by the service whatever the store (hits carry presigned URLs for
    direct access): one URL that always works, and a clear 503 when the store is down. The bytes behind an
    id never change, but an image can be deleted: caches keep it and revalidate on every use (304 while it
    exists)."""
    etag = f'"{image_id}-{kind}"'
    headers = {"Cache-Control": "private, no-cache", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        await in_thread(catalog.metadata, image_id)  # a deleted image is a 404, not a 304
        return Response(status_code=304, headers=headers)
    data, media_type = await in_thread(catalog.blob, image_id, kind)
    return Response(data, media_type=media_type, headers=headers)


async def status_response(catalog: Catalog, embedding: Embedding, settings: Settings, principal: Principal) -> StatusResponse:
    """Count, models, index, backends; where the backends are (URIs, paths, error details) for admins only."""
    description = await in_thread(embedding.describe)
    copy = await in_thread(catalog.copy_model)
    info, problems = await in_thread(catalog.problems)
    admin = "admin" in principal.scopes
    limits = Limits(
        max_upload_bytes=settings.limits.max_upload_bytes,
        max_image_pixels=settings.limits.max_image_pixels,
        max_top_k=settings.limits.max_top_k,
        default_top_k=settings.limits.default_top_k,
        embed_max_batch_size=settings.batching.max_batch_size,
        embed_max_latency_ms=settings.batching.max_latency_ms,
    )
    store = catalog.store.info()
    return StatusResponse(
        ready=not problems,
        count=info.count if info else -1,
        model=description.info,
        device=description.device,
        copy_model=copy.info if copy else None,
        copy_device=copy.device if copy else None,
        index=info.index if info else IndexSpec(index_type=settings.milvus.index_type),
        metric=info.metric if info else "COSINE",
        collection=settings.milvus.collection,
        milvus_backend=settings.milvus.backend,
        milvus_uri=settings.milvus.uri if admin else None,
        store=store if admin else store.model_copy(update={"location": None}),
        limits=limits,
        thresholds=await in_thread(catalog.thresholds),
        error="; ".join(problems) if admin or not problems else "a backend is unavailable (details: admin keys)",
        scopes=sorted(principal.scopes),
        keys=key_table().configured,
    )


async def serving_model(catalog: Catalog, embedding: Embedding, role: Role) -> ModelDescription:
    """The similarity model, or the copy model (404 where none serves)."""
    description = await in_thread(embedding.describe) if role == "similarity" else await in_thread(catalog.copy_model)
    if description is None:
        raise NotFound("No copy model serves here (RIS_MODEL_COPY_NAME=none).")
    return description


async def embed_response(catalog: Catalog, embedding: Embedding, request: Request, role: Role) -> Response:
    """POST /api/embed: .npy uint8 pixels in, .npy float32 vectors out. ``X-Recipe-Version``, where sent (the
    ingest client does), must be the serving recipe's: pixels prepared by another version of the recipe (an
    older client that embeds a view at another side) would be accepted by their shape alone and stored as
    wrong vectors."""
    recipe = (await serving_model(catalog, embedding, role)).preprocessing
    pixels = read_npy(await request.body(), request.headers.get("content-type", ""), recipe.input_sides)
    sent = request.headers.get("x-recipe-version")
    if sent is not None and sent != recipe.version:
        raise ModelMismatch(f"These pixels were prepared with recipe {sent[:200]!r}; this service embeds {recipe.version!r}.")
    vectors, model = await in_thread(catalog.embed_pixels, pixels, role)
    out = io.BytesIO()
    np.save(out, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
    return Response(out.getvalue(), media_type="application/x-npy", headers={"X-Model-Id": model.model_id})
