"""BentoML services: thin edges over the domain (bento/catalog.py and the models/ it uses).

- ``Embedder``: batchable pixels -> vectors (GPU when present), adaptive batching.
- ``VectorSearch``: the single owner of the Milvus connection (Milvus Lite allows one process per file).
- ``ImageSearch``: the entry service; HTTP API (``/api/...``), the web page (``/``) and OpenAPI docs
  (``/docs``). Its routes parse the request, call the catalog (in a worker thread: decoding is CPU work
  and the catalog's calls to the two services above are blocking), and shape the response.

Domain errors cross from a service to its caller as data (``Reply``) and are raised there as the same
class; ``HTTP_STATUS`` below is the one place they become HTTP statuses.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import aiohttp
import anyio
import bentoml
import numpy as np
import psutil
from bentoml.exceptions import BentoMLException
from bentoml.validators import DType
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bento.auth import KeyTable, Principal, Scope, is_loopback, presented_key
from bento.catalog import Catalog, SearchResult
from bento.config import Settings, get_settings
from bento.duplicates import DuplicatePage, DuplicateQuery
from bento.errors import (
    BackendUnavailable,
    Conflict,
    ConnectionDropped,
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
from bento.fetch import UrlFetcher
from bento.imaging import check_size
from bento.listing import BrowsePage, BrowseQuery, LabelList
from bento.metrics import (
    INTERNAL,
    HttpMetrics,
    RouteTemplates,
    count_embedder_request,
    exposition,
    fixed_routes,
    leaf_routes,
    start_embedder_requests,
)
from bento.retry import FAIL_FAST
from bento.schemas import (
    MAX_LABEL_LENGTH,
    CopyModel,
    DeleteResponse,
    ErrorResponse,
    GalleryPage,
    Health,
    ImageCard,
    ImageMetadata,
    IndexInfo,
    IndexSpec,
    InsertResponse,
    Limits,
    ModelDescription,
    Reply,
    SearchById,
    SearchByUrl,
    SearchHit,
    SearchMode,
    SearchOptions,
    SearchResponse,
    StatusResponse,
    VectorHit,
    VectorQuery,
    VectorRecord,
)
from bento.storage import Kind, open_image_store
from bento.vectors import VectorIndex, copy_collection
from models.backbones import Role
from models.pipeline import MAX_PIXELS_BYTES, check_pixel_shape
from models.runtime import torch_installed

logger = logging.getLogger("ris.service")
P = ParamSpec("P")
T = TypeVar("T")
STATIC_DIR = Path(__file__).parent / "bento" / "static"

# BentoML's decorators take workers, resources, batching and dependency URLs when the classes below are
# defined, so the settings are read at import (validated, and unknown RIS_* variables refused); nothing
# else happens at import: clients and models are made in the services' __init__.
DEPLOYMENT = get_settings()

# How callers of a service pool their connections to it. BentoML 1.4.40 replaces its HTTP session every
# 100 requests or 300 s by default and closes the old one under calls still in flight on it
# (bentoml/BentoML#5540): under load that failed searches with 500s. The session is never recycled
# (the peers are fixed service addresses); a connection the peer closes is ConnectionDropped, retried.
DEPENDENCY_CONNECTION = {"max_requests": 2**62, "max_age": 10 * 365 * 24 * 3600.0}


def embedder_resources(settings: Settings) -> dict[str, Any]:
    """One GPU for the embedder when the model is to run on CUDA (or auto and a GPU is present, and PyTorch
    is here to use it: the CPU image, on a GPU node, runs on the CPU and asks for nothing)."""
    gpu_here = shutil.which("nvidia-smi") and torch_installed()
    wants_gpu = settings.model.device == "cuda" or (settings.model.device == "auto" and gpu_here)
    return {"gpu": 1} if wants_gpu else {}


def embed_batching_options(settings: Settings) -> dict[str, Any]:
    """Adaptive batching of the embed API (README: "Adaptive batching"); off = one model call per request."""
    if not settings.batching.enabled:
        return {}
    return {
        "batchable": True,
        "batch_dim": 0,
        "max_batch_size": settings.batching.max_batch_size,
        "max_latency_ms": settings.batching.max_latency_ms,
    }


@bentoml.service(
    name="embedder",
    workers=1,
    resources=embedder_resources(DEPLOYMENT),
    traffic={"timeout": 120, "max_concurrency": 256},
    runner_connection=DEPENDENCY_CONNECTION,
)
class Embedder:
    """Embeds preprocessed pixels with the similarity model and the copy model (each API batches one model at
    one input side). Loads the models (the model store; the installed package of a packaged copy model) and
    warms them up."""

    def __init__(self) -> None:
        from models.store import load_embedders

        self.embedders = load_embedders(get_settings())
        self.embedder = self.embedders.similarity
        self.embedders.warm_up()

    # The dtypes are declared: reached by URL (its own Deployment), BentoML's client sends arrays as JSON
    # lists, which arrive as int64 without them (found running the two containers; inside one `bentoml
    # serve` the arrays travel as binary pickles and keep their dtype).
    @bentoml.api(**embed_batching_options(DEPLOYMENT))
    def embed(self, pixels: Annotated[np.ndarray, DType("uint8")]) -> Annotated[np.ndarray, DType("float32")]:
        """(N, crop, crop, 3) uint8 -> (N, dim) float32 unit vectors (callers check the shape first)."""
        return self.embedder.embed(pixels)

    @bentoml.api(**embed_batching_options(DEPLOYMENT))
    def embed_small(self, pixels: Annotated[np.ndarray, DType("uint8")]) -> Annotated[np.ndarray, DType("float32")]:
        """The same at the recipe's smaller input side (the low-res view, 112 px): a batch is one array, so
        each input side has its own batcher (RemoteEmbedder sends each side to its own)."""
        return self.embedder.embed(pixels)

    @bentoml.api(**embed_batching_options(DEPLOYMENT))
    def embed_copy(self, pixels: Annotated[np.ndarray, DType("uint8")]) -> Annotated[np.ndarray, DType("float32")]:
        """The copy model: (N, side, side, 3) uint8 at its recipe's side (288: the whole image) -> (N, 512)."""
        return self.embedders.embed(pixels, "copy")

    @bentoml.api
    def embed_npy(self, pixels: Path, role: Role = "similarity") -> Annotated[np.ndarray, DType("float32")]:
        """The same for a caller that reaches this service by URL (its own Deployment): BentoML's client
        sends arrays as JSON there (25 MB and ~2.5 s of CPU for 32 images, measured), a file as a binary
        multipart part. A .npy of uint8 pixels, checked as POST /api/embed checks its body (read_npy);
        embedded in one call (the caller's batch), not through the adaptive batcher."""
        model = self.embedders.model(role)
        array = read_npy(pixels.read_bytes(), "application/x-npy", model.preprocessing.input_sides)
        return model.embed(array)

    @bentoml.api
    def describe(self) -> ModelDescription:
        """The similarity model and its preprocessing recipe (callers prepare pixels with it)."""
        return self.embedder.describe()

    @bentoml.api
    def describe_copy(self) -> CopyModel:
        """The copy model and its recipe (description null: none serves)."""
        return CopyModel(description=self.embedders.describe_copy())


# BentoML's own routes next to a service's APIs: probes and scrapes, not load.
BENTOML_PROBES = ("/livez", "/readyz", "/healthz", "/metrics")
# The product's request metrics of the embedder (bento/metrics.py): its in-progress gauge is what its
# autoscalers read. BentoML's own metrics stay on here (its adaptive batch sizes; its paths are this
# service's few routes, reached only by the API pods).
Embedder.add_asgi_middleware(
    HttpMetrics, routes=fixed_routes([*(api.route for api in Embedder.apis.values()), *BENTOML_PROBES]), not_load=BENTOML_PROBES
)


@bentoml.service(name="vector-search", workers=1, traffic={"timeout": 600}, runner_connection=DEPENDENCY_CONNECTION)
class VectorSearch:
    """Owns the one Milvus connection. Opens the collection lazily, once the model is known.

    Each API answers a ``Reply``: the value, or the domain error as data."""

    embedder = bentoml.depends(Embedder, url=DEPLOYMENT.services.embedder_url or None)

    def __init__(self) -> None:
        self.settings = get_settings()
        self._indexes: dict[Role, VectorIndex] | None = None
        # Readiness probes and first requests arrive together; only one of them may open the indexes
        # (a second opener of a Milvus Lite file would find it locked).
        self._index_lock = threading.Lock()
        # Opening the index asks the embedder which model serves: a request the scale-to-zero trigger sees.
        start_embedder_requests([INTERNAL])

    def _vectors(self, role: Role = "similarity") -> VectorIndex:
        """The similarity collection, or the copy collection (the same Milvus connection settings)."""
        with self._index_lock:
            if self._indexes is None:
                embedder = RemoteEmbedder(self.embedder)
                indexes: dict[Role, VectorIndex] = {"similarity": VectorIndex(self.settings, embedder.describe().info)}
                copy = embedder.describe_copy()
                if copy is not None:
                    indexes["copy"] = VectorIndex(self.settings, copy.info, copy_collection(self.settings.milvus.collection))
                self._indexes = indexes
            if role not in self._indexes:
                raise InvalidRequest("No copy model serves here, so there is no copy collection.")
            return self._indexes[role]

    def _reply(self, operation: Callable[[VectorIndex], Any], role: Role = "similarity") -> Reply:
        try:
            return Reply.of(operation(self._vectors(role)))
        except SearchError as exc:
            return Reply.failed(exc)

    def __is_ready__(self) -> bool:
        health = self.health()
        if not health.ok and health.error is not None:
            logger.warning("vector search not ready: %s", health.error.message)
        if health.ok:  # the gallery's listing, read from the start (a no-op once read)
            self._vectors().start_listing()
        return health.ok

    @bentoml.on_shutdown
    def close(self) -> None:
        for index in (self._indexes or {}).values():
            index.close()

    # Each API works on the similarity collection or, with role="copy", on the copy collection.
    @bentoml.api
    def search(self, query: VectorQuery, role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.search(query), role)

    @bentoml.api
    def upsert(self, records: list[VectorRecord], role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.upsert(records), role)

    @bentoml.api
    def get(self, ids: list[str], role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.get(ids), role)

    @bentoml.api
    def get_vector(self, image_id: str, role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.get_vector(image_id), role)

    @bentoml.api
    def existing_ids(self, ids: list[str], role: Role = "similarity") -> Reply:
        return self._reply(lambda index: sorted(index.existing_ids(ids)), role)

    @bentoml.api
    def delete(self, ids: list[str], role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.delete(ids), role)

    @bentoml.api
    def info(self, role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.info(), role)

    @bentoml.api
    def rebuild_index(self, spec: IndexSpec, role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.rebuild_index(spec), role)

    @bentoml.api
    def duplicates(self, query: DuplicateQuery, role: Role = "similarity") -> Reply:
        return self._reply(lambda index: index.duplicates(query), role)

    @bentoml.api
    def browse(self, query: BrowseQuery) -> Reply:
        return self._reply(lambda index: index.browse(query))

    @bentoml.api
    def labels(self) -> Reply:
        return self._reply(lambda index: index.labels())

    @bentoml.api
    def health(self, role: Role = "similarity") -> Health:
        """Never raises: what /api/status and readiness show when the vector store is down."""
        try:
            self._vectors(role).ping()
        except SearchError as exc:
            return Health(ok=False, error=exc.to_payload())
        return Health(ok=True)


# --- adapters: the catalog's ports over the two services above ---------------------------------------


@contextlib.contextmanager
def calling(dependency: str) -> Iterator[None]:
    """Transport failures of a call to a dependent service, as domain errors (by type)."""
    try:
        yield
    except BentoMLException as exc:
        status = exc.error_code.value if exc.error_code else 500
        # Domain errors come back as replies; an HTTP error here is the service itself failing (or
        # shedding load: 503), and its body says nothing the client can act on.
        raise BackendUnavailable(
            f"The {dependency} service failed or is unavailable (HTTP {status}); see GET /api/status and its log."
        ) from exc
    except aiohttp.ClientConnectionError as exc:
        raise ConnectionDropped(f"The connection to the {dependency} service was dropped: {exc}") from exc
    except (TimeoutError, OSError, aiohttp.ClientError) as exc:
        raise BackendUnavailable(f"The {dependency} service is unreachable: {exc.__class__.__name__}: {exc}") from exc


class RemoteEmbedder:
    """The ``Embedding`` port over the Embedder service (blocking: call from a worker thread). Every call
    to the service is counted first (ris_embedder_requests_total), answered or not: the demand that wakes
    an embedder scaled to zero."""

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy
        self._description: ModelDescription | None = None
        self._copy: CopyModel | None = None

    def describe(self) -> ModelDescription:
        if self._description is None:
            count_embedder_request()
            with calling("embedder"):
                answer = self._proxy.to_sync.describe()
            self._description = ModelDescription.model_validate(answer, from_attributes=True)
        return self._description

    def describe_copy(self) -> ModelDescription | None:
        if self._copy is None:
            count_embedder_request()
            with calling("embedder"):
                answer = self._proxy.to_sync.describe_copy()
            self._copy = CopyModel.model_validate(answer, from_attributes=True)
        return self._copy.description

    def embed(self, pixels: np.ndarray, role: Role = "similarity") -> np.ndarray:
        if not DEPLOYMENT.services.embedder_url:  # inside one `bentoml serve`: binary, adaptive batching
            main_side = role == "copy" or pixels.shape[1] == self.describe().preprocessing.crop  # (cached)
            count_embedder_request()
            with calling("embedder"):
                if role == "copy":
                    return self._proxy.to_sync.embed_copy(pixels=pixels)
                if main_side:
                    return self._proxy.to_sync.embed(pixels=pixels)
                return self._proxy.to_sync.embed_small(pixels=pixels)
        # By URL: as a .npy file (binary), not as BentoML's JSON arrays.
        count_embedder_request()
        with tempfile.NamedTemporaryFile(suffix=".npy") as file:
            np.save(file, np.ascontiguousarray(pixels, dtype=np.uint8), allow_pickle=False)
            file.flush()
            with calling("embedder"):
                vectors = self._proxy.to_sync.embed_npy(pixels=Path(file.name), role=role)
        return np.asarray(vectors, dtype=np.float32)


class RemoteVectors:
    """The ``VectorStore`` port over the VectorSearch service (blocking: call from a worker thread), on the
    similarity collection or (``role="copy"``) the copy collection."""

    def __init__(self, proxy: Any, role: Role = "similarity") -> None:
        self._proxy = proxy
        self._role = role

    def _call(self, kind: Any, call: Callable[[Any], Any]) -> Any:
        with calling("vector-search"):
            answer = call(self._proxy.to_sync)
        return Reply.model_validate(answer, from_attributes=True).unwrap(kind)

    def ensure_ready(self) -> None:
        self.ping()

    def ping(self) -> None:
        with calling("vector-search"):
            health = Health.model_validate(self._proxy.to_sync.health(role=self._role), from_attributes=True)
        if health.error is not None:
            raise health.error.to_exception()

    def existing_ids(self, ids: list[str]) -> set[str]:
        return self._call(set[str], lambda client: client.existing_ids(ids=ids, role=self._role))

    def get(self, ids: list[str]) -> list[ImageMetadata]:
        return self._call(list[ImageMetadata], lambda client: client.get(ids=ids, role=self._role))

    def get_vector(self, image_id: str) -> list[float] | None:
        return self._call(list[float] | None, lambda client: client.get_vector(image_id=image_id, role=self._role))

    def upsert(self, records: list[VectorRecord]) -> int:
        return self._call(int, lambda client: client.upsert(records=records, role=self._role))

    def search(self, query: VectorQuery) -> list[VectorHit]:
        return self._call(list[VectorHit], lambda client: client.search(query=query, role=self._role))

    def delete(self, ids: list[str]) -> int:
        return self._call(int, lambda client: client.delete(ids=ids, role=self._role))

    def count(self) -> int:
        return self.info().count

    def info(self) -> IndexInfo:
        return self._call(IndexInfo, lambda client: client.info(role=self._role))

    def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        return self._call(IndexInfo, lambda client: client.rebuild_index(spec=spec, role=self._role))

    def duplicates(self, query: DuplicateQuery) -> DuplicatePage:
        return self._call(DuplicatePage, lambda client: client.duplicates(query=query, role=self._role))

    def browse(self, query: BrowseQuery) -> BrowsePage:
        return self._call(BrowsePage, lambda client: client.browse(query=query))

    def labels(self) -> LabelList:
        return self._call(LabelList, lambda client: client.labels())

    def flush(self) -> None:
        """Milvus seals segments by itself; the service has no bulk writes to seal."""

    def close(self) -> None:
        """The connection belongs to BentoML's dependency client, which closes it."""


# --- the HTTP edge ----------------------------------------------------------------------------------

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


app = FastAPI(
    title="Reverse image search",
    description="Upload a photo, get the most similar images. Errors are JSON: {error, detail}. "
    "Writes and admin actions need an API key (Authorization: Bearer KEY, or X-API-Key).",
    version="0.1.0",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
app.add_middleware(EdgeGuard, settings=DEPLOYMENT)
# Outermost of the app's middleware (it counts EdgeGuard's 413s too). BentoML's own request metrics are off
# for this service (they label raw paths: a series per image id); these label route templates.
app_routes = RouteTemplates(app, unmatched=lambda route: getattr(route, "endpoint", None) is _no_such_route)
app.add_middleware(HttpMetrics, routes=app_routes, not_load=("/ready", "/metrics"))
app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# --- who may do what ----------------------------------------------------------------------------------


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


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def in_worker_threads(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Two calls at the same time from a request's worker thread (the catalog's two collection searches):
    each in a thread of AnyIO's pool, where the dependency clients (``to_sync``) work; an error of either is
    raised here as it was (no exception group)."""
    outcomes: list[tuple[bool, Any]] = [(True, None), (True, None)]

    async def run(index: int, call: Callable[[], Any]) -> None:
        try:
            outcomes[index] = (True, await anyio.to_thread.run_sync(call))
        except Exception as exc:  # noqa: BLE001 - handed back and raised in the caller's thread below
            outcomes[index] = (False, exc)

    async def both() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(run, 0, first)
            group.start_soon(run, 1, second)

    anyio.from_thread.run(both)
    for ok, value in outcomes:
        if not ok:
            raise value
    return outcomes[0][1], outcomes[1][1]


async def _read_upload(upload: UploadFile, max_bytes: int) -> bytes:
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


# metrics disabled: BentoML's request metrics of this service (bento/metrics.py says why) and its /metrics
# route; the app serves /metrics itself (every process's series, BentoML's of the other services included).
@bentoml.service(
    name="image-search", workers=DEPLOYMENT.services.api_workers, traffic={"timeout": 120}, metrics={"enabled": False}
)
@bentoml.asgi_app(app, path="/")
class ImageSearch:
    """The HTTP API and the web page."""

    embedder = bentoml.depends(Embedder, url=DEPLOYMENT.services.embedder_url or None)
    vectors = bentoml.depends(VectorSearch, url=DEPLOYMENT.services.vector_search_url or None)

    def __init__(self) -> None:
        self.settings = get_settings()
        self.remote_embedder = RemoteEmbedder(self.embedder)
        self.catalog = Catalog(
            RemoteVectors(self.vectors),
            open_image_store(self.settings),
            self.remote_embedder,
            self.settings.limits,
            self.settings.store.thumbnail_size,
            FAIL_FAST,  # a request answers 503 at once; only a dropped connection is retried
            self.settings.store.serve_location,
            self.settings.verdict,
            # used where the embedder says a copy model serves (asked lazily: it may be scaled to zero now)
            RemoteVectors(self.vectors, "copy"),
            in_worker_threads,
        )
        self.fetcher = UrlFetcher(self.settings.fetch, self.settings.limits.max_upload_bytes)
        self.client_limits = ClientLimits(self.settings.limits.expensive_per_minute)
        start_embedder_requests([*app_routes.all(), INTERNAL])
        loopback = listening_on_loopback_only()
        # Exactly what is open, once at start (the README's Security section explains the rules).
        logger.warning("%s (listening on %s).", key_table().describe(loopback), "loopback only" if loopback else "a non-loopback address")

    async def __is_ready__(self) -> bool:
        """Model known and the image store reachable (BentoML adds the dependencies' readiness)."""
        try:
            await in_thread(self.remote_embedder.describe)
            await in_thread(self.catalog.store.ping)
        except SearchError as exc:
            logger.warning("not ready: %s", exc.message)
            return False
        return True

    # --- shaping --------------------------------------------------------------------------------
    def _card(self, meta: ImageMetadata) -> dict[str, Any]:
        return {
            **meta.model_dump(),
            "image_url": self.catalog.direct_url(meta.id, "original") or f"/api/images/{meta.id}",
            "thumbnail_url": self.catalog.direct_url(meta.id, "thumbnail") or f"/api/images/{meta.id}/thumbnail",
        }

    def _hit(self, hit: VectorHit) -> SearchHit:
        return SearchHit(**self._card(hit.image), score=round(hit.score, 6), verdict=hit.verdict, match=hit.match)

    def _response(self, result: SearchResult) -> SearchResponse:
        return SearchResponse(**result.model_dump(exclude={"hits"}), hits=[self._hit(hit) for hit in result.hits])

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/ready", include_in_schema=False)
    async def ready(self) -> JSONResponse:
        """This API pod's readiness (the Kubernetes probe): the vector search service and the image store
        answer. Unlike BentoML's /readyz it leaves the embedder out: while no embedder runs (drained, or
        scaled to zero) upload searches answer 503, and the page, search by id and images keep working."""
        try:
            await in_thread(self.catalog.vectors.ping)
            await in_thread(self.catalog.store.ping)
        except SearchError as exc:
            logger.warning("not ready: %s", exc.message)
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    @app.post("/api/search", response_model=SearchResponse, responses={413: {"model": ErrorResponse}})
    async def search_upload(
        self,
        _: Searcher,
        file: Annotated[UploadFile, File(description="The query image.")],
        mode: Annotated[SearchMode, Form(description="both (copies first, then similar images), copies, or similar.")] = "both",
        top_k: Annotated[int | None, Form(ge=1)] = None,
        offset: Annotated[int, Form(ge=0)] = 0,
        label: Annotated[str | None, Form(max_length=MAX_LABEL_LENGTH)] = None,
        min_score: Annotated[float | None, Form(ge=-1, le=1)] = None,
    ) -> SearchResponse:
        """Search with an uploaded image (multipart form)."""
        data = await _read_upload(file, self.settings.limits.max_upload_bytes)
        options = SearchOptions(mode=mode, top_k=top_k, offset=offset, label=label or None, min_score=min_score)
        return self._response(await in_thread(self.catalog.search_image, data, options))

    @app.post("/api/search/url", response_model=SearchResponse)
    async def search_url(self, request: Request, principal: Searcher, body: SearchByUrl) -> SearchResponse:
        """Search with an image fetched from a public http(s) URL (see README: Security)."""
        self.client_limits.charge(request, principal, "URL search")
        data = await self.fetcher.fetch(body.url)
        return self._response(await in_thread(self.catalog.search_image, data, body))

    @app.post("/api/search/id", response_model=SearchResponse)
    async def search_id(self, _: Searcher, body: SearchById) -> SearchResponse:
        """Search with an image already in the collection (no re-embedding)."""
        return self._response(await in_thread(self.catalog.search_stored, body.id, body))

    @app.post("/api/images", response_model=InsertResponse, status_code=201)
    async def insert(
        self,
        request: Request,
        principal: Writer,
        file: Annotated[UploadFile, File(description="The image to add.")],
        label: Annotated[str | None, Form(max_length=MAX_LABEL_LENGTH)] = None,
    ) -> Response:
        """Add one image (scope `write`). Its id is the sha256 of its bytes: adding the same bytes again changes nothing."""
        self.client_limits.charge(request, principal, "insert")
        data = await _read_upload(file, self.settings.limits.max_upload_bytes)
        added = await in_thread(self.catalog.add, data, label, file.filename or "upload")
        message = "Added." if added.created else "Already present; nothing changed."
        body = InsertResponse(id=added.id, created=added.created, message=message, image=added.image)
        return JSONResponse(body.model_dump(), status_code=201 if added.created else 200)

    @app.get("/api/images", response_model=GalleryPage, responses={202: {"model": GalleryPage}})
    async def gallery(
        self,
        _: Searcher,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=200)] = 24,
        label: Annotated[str | None, Query(max_length=MAX_LABEL_LENGTH, description='Only this label ("": images without one).')] = None,
    ) -> Response:
        """The collection, newest first, paged. 202 with state "scanning" while the service first reads its
        listing (a large collection takes a while); writes made through the service show at once."""
        page = await in_thread(self.catalog.browse, offset, limit, label)
        body = GalleryPage(
            state=page.state, total=page.total, offset=offset, limit=limit, label=label,
            images=[ImageCard(**self._card(meta)) for meta in page.images],
        )
        return while_not_ready(body, page.state == "ready")

    @app.get("/api/labels", response_model=LabelList, responses={202: {"model": LabelList}})
    async def labels(self, _: Searcher) -> Response:
        """Every label in use and how many images carry it, most used first ("" counts images without one)."""
        labels = await in_thread(self.catalog.labels)
        return while_not_ready(labels, labels.state == "ready")

    @app.get("/api/images/{image_id}", responses={404: {"model": ErrorResponse}})
    async def get_image(self, request: Request, _: Searcher, image_id: str) -> Response:
        """The original image bytes, without their GPS location (503 when the store is down)."""
        return await self._blob_response(request, image_id, "original")

    @app.get("/api/images/{image_id}/thumbnail", responses={404: {"model": ErrorResponse}})
    async def get_thumbnail(self, request: Request, _: Searcher, image_id: str) -> Response:
        return await self._blob_response(request, image_id, "thumbnail")

    async def _blob_response(self, request: Request, image_id: str, kind: Kind) -> Response:
        # Streamed by the service whatever the store (hits carry presigned URLs for direct access): one URL
        # that always works, and a clear 503 when the store is down. The bytes behind an id never change,
        # but an image can be deleted: caches keep it and revalidate on every use (304 while it exists).
        etag = f'"{image_id}-{kind}"'
        headers = {"Cache-Control": "private, no-cache", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            await in_thread(self.catalog.metadata, image_id)  # a deleted image is a 404, not a 304
            return Response(status_code=304, headers=headers)
        data, media_type = await in_thread(self.catalog.blob, image_id, kind)
        return Response(data, media_type=media_type, headers=headers)

    @app.get("/api/images/{image_id}/metadata", response_model=ImageMetadata)
    async def get_metadata(self, _: Searcher, image_id: str) -> ImageMetadata:
        return await in_thread(self.catalog.metadata, image_id)

    @app.get("/api/duplicates", response_model=DuplicatePage, responses={202: {"model": DuplicatePage}})
    async def duplicates(
        self,
        _: Writer,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
        refresh: bool = False,
    ) -> Response:
        """Groups of duplicate images (scope `write`: it is for cleaning up): exact (same pixels), then near
        (score >= the near-duplicate threshold), larger groups first, paged. The report is computed in the
        background: 202 with state "running" until it is ready; `refresh=true` scans again."""
        page = await in_thread(self.catalog.duplicates, offset, limit, refresh)
        return while_not_ready(page, page.state == "ready")

    @app.delete("/api/images/{image_id}", response_model=DeleteResponse)
    async def delete_image(self, _: Writer, image_id: str) -> DeleteResponse:
        """Remove an image, its vector and its thumbnail (scope `write`)."""
        await in_thread(self.catalog.remove, image_id)
        return DeleteResponse(id=image_id, deleted=True)

    @app.get("/api/status", response_model=StatusResponse, response_model_exclude_none=True)
    async def status(self, principal: Searcher) -> StatusResponse:
        """Count, model, index, backends. Answers even when Milvus is down (ready=false). Where the
        backends are (URIs, paths, error details) is shown to `admin` keys only."""
        description = await in_thread(self.remote_embedder.describe)
        copy = await in_thread(self.catalog.copy_model)
        info, problems = await in_thread(self.catalog.problems)
        settings = self.settings
        admin = "admin" in principal.scopes
        limits = Limits(
            max_upload_bytes=settings.limits.max_upload_bytes,
            max_image_pixels=settings.limits.max_image_pixels,
            max_top_k=settings.limits.max_top_k,
            default_top_k=settings.limits.default_top_k,
            embed_max_batch_size=settings.batching.max_batch_size,
            embed_max_latency_ms=settings.batching.max_latency_ms,
        )
        store = self.catalog.store.info()
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
            thresholds=await in_thread(self.catalog.thresholds),
            error="; ".join(problems) if admin or not problems else "a backend is unavailable (details: admin keys)",
            scopes=sorted(principal.scopes),
            keys=key_table().configured,
        )

    @app.post("/api/index", response_model=IndexInfo, response_model_exclude_none=True)
    async def rebuild_index(self, _: Admin, spec: IndexSpec) -> IndexInfo:
        """(Re)build the vector index (scope `admin`): FLAT, IVF_FLAT, IVF_SQ8, HNSW; one at a time (409)."""
        return await in_thread(self.catalog.rebuild_index, spec)

    @app.get("/api/model", response_model=ModelDescription, responses={404: {"model": ErrorResponse}})
    async def model(self, _: Searcher, role: Role = "similarity") -> ModelDescription:
        """A serving model and its preprocessing recipe (the ingest job's --service-url reads this): the
        similarity model, or with role=copy the copy model (404: none serves)."""
        if role == "similarity":
            return await in_thread(self.remote_embedder.describe)
        copy = await in_thread(self.catalog.copy_model)
        if copy is None:
            raise NotFound("No copy model serves here (RIS_MODEL_COPY_NAME=none).")
        return copy

    @app.post("/api/embed", response_class=Response)
    async def embed(self, request: Request, principal: Admin, role: Role = "similarity") -> Response:
        """Batch embedding for the ingest job (scope `admin`): .npy uint8 pixels in, .npy float32 vectors out,
        by the similarity model or (role=copy) the copy model.
        ``X-Recipe-Version``, where sent (the ingest client does), must be the serving recipe's: pixels
        prepared by another version of the recipe (an older client that embeds a view at another side)
        would be accepted by their shape alone and stored as wrong vectors."""
        description = await in_thread(self.remote_embedder.describe) if role == "similarity" else await in_thread(self.catalog.copy_model)
        if description is None:
            raise NotFound("No copy model serves here (RIS_MODEL_COPY_NAME=none).")
        recipe = description.preprocessing
        pixels = read_npy(await request.body(), request.headers.get("content-type", ""), recipe.input_sides)
        sent = request.headers.get("x-recipe-version")
        if sent is not None and sent != recipe.version:
            raise ModelMismatch(f"These pixels were prepared with recipe {sent[:200]!r}; this service embeds {recipe.version!r}.")
        vectors, model = await in_thread(self.catalog.embed_pixels, pixels, role)
        out = io.BytesIO()
        np.save(out, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
        return Response(out.getvalue(), media_type="application/x-npy", headers={"X-Model-Id": model.model_id})


def while_not_ready(body: Any, ready: bool) -> JSONResponse:
    """A result computed in the background: 200 once it is ready, 202 (with its state) until then."""
    return JSONResponse(body.model_dump(), status_code=200 if ready else 202)


@app.get("/metrics", include_in_schema=False)
def _metrics_page() -> Response:
    """Prometheus text of every process of this service: the product's series (bento/metrics.py) and
    BentoML's of the other services here (vector-search; the embedder too inside one `bentoml serve`)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


@app.api_route(
    "/{unknown:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False
)
async def _no_such_route(request: Request, unknown: str) -> JSONResponse:
    """Last route: BentoML answers paths no route of ours takes with a plain-text 404; this keeps every
    answer in the API's JSON error shape (a known path with another method is a 405)."""
    known_path = any(
        route.endpoint is not _no_such_route and route.matches(request.scope)[0] == Match.PARTIAL
        for route in leaf_routes(app.router.routes)
        if isinstance(route, APIRoute)
    )
    status, code = (405, "method_not_allowed") if known_path else (404, "not_found")
    detail = f"{request.method} is not allowed here" if known_path else f"No route /{unknown}"
    return JSONResponse(ErrorResponse(error=code, detail=detail).model_dump(), status_code=status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the API's own error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        ErrorResponse(error=code, detail=str(exc.detail)).model_dump(), status_code=exc.status_code, headers=exc.headers
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse(ErrorResponse(error="validation_error", detail=problems).model_dump(), status_code=422)


@app.exception_handler(SearchError)
async def _domain_error(request: Request, exc: SearchError) -> JSONResponse:
    principal = getattr(request.state, "principal", None)
    response = error_response(exc, reveal=principal is not None and "admin" in principal.scopes)
    if response.status_code >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    return response
