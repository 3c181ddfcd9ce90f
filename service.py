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
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import aiohttp
import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from bento.catalog import Catalog, SearchResult
from bento.config import Settings, get_settings
from bento.errors import (
    BackendUnavailable,
    ConnectionDropped,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelMismatch,
    ModelUnavailable,
    NotFound,
    SearchError,
    UnsupportedImageFormat,
    UrlFetchFailed,
)
from bento.fetch import UrlFetcher
from bento.imaging import check_size
from bento.retry import FAIL_FAST
from bento.schemas import (
    MAX_LABEL_LENGTH,
    DeleteResponse,
    ErrorResponse,
    Health,
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
    SearchOptions,
    SearchResponse,
    StatusResponse,
    VectorHit,
    VectorQuery,
    VectorRecord,
)
from bento.storage import open_image_store
from bento.vectors import VectorIndex

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
    """One GPU for the embedder when the model is to run on CUDA (or auto and a GPU is present)."""
    wants_gpu = settings.model.device == "cuda" or (settings.model.device == "auto" and shutil.which("nvidia-smi"))
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
    """Embeds preprocessed pixels. Loads the model from the BentoML model store and warms it up."""

    def __init__(self) -> None:
        from models.store import load_embedder

        self.embedder = load_embedder(get_settings())
        self.embedder.warm_up()

    @bentoml.api(**embed_batching_options(DEPLOYMENT))
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 -> (N, dim) float32 unit vectors (callers check the shape first)."""
        return self.embedder.embed(pixels)

    @bentoml.api
    def describe(self) -> ModelDescription:
        """The serving model and its preprocessing recipe (callers prepare pixels with it)."""
        return self.embedder.describe()


@bentoml.service(name="vector-search", workers=1, traffic={"timeout": 600}, runner_connection=DEPENDENCY_CONNECTION)
class VectorSearch:
    """Owns the one Milvus connection. Opens the collection lazily, once the model is known.

    Each API answers a ``Reply``: the value, or the domain error as data."""

    embedder = bentoml.depends(Embedder, url=DEPLOYMENT.services.embedder_url or None)

    def __init__(self) -> None:
        self.settings = get_settings()
        self._index: VectorIndex | None = None
        # Readiness probes and first requests arrive together; only one of them may open the index
        # (a second opener of a Milvus Lite file would find it locked).
        self._index_lock = threading.Lock()

    def _vectors(self) -> VectorIndex:
        with self._index_lock:
            if self._index is None:
                model = RemoteEmbedder(self.embedder).describe().info
                self._index = VectorIndex(self.settings, model)
            return self._index

    def _reply(self, operation: Callable[[VectorIndex], Any]) -> Reply:
        try:
            return Reply.of(operation(self._vectors()))
        except SearchError as exc:
            return Reply.failed(exc)

    def __is_ready__(self) -> bool:
        health = self.health()
        if not health.ok and health.error is not None:
            logger.warning("vector search not ready: %s", health.error.message)
        return health.ok

    @bentoml.on_shutdown
    def close(self) -> None:
        if self._index is not None:
            self._index.close()

    @bentoml.api
    def search(self, query: VectorQuery) -> Reply:
        return self._reply(lambda index: index.search(query))

    @bentoml.api
    def upsert(self, records: list[VectorRecord]) -> Reply:
        return self._reply(lambda index: index.upsert(records))

    @bentoml.api
    def get(self, ids: list[str]) -> Reply:
        return self._reply(lambda index: index.get(ids))

    @bentoml.api
    def get_vector(self, image_id: str) -> Reply:
        return self._reply(lambda index: index.get_vector(image_id))

    @bentoml.api
    def existing_ids(self, ids: list[str]) -> Reply:
        return self._reply(lambda index: sorted(index.existing_ids(ids)))

    @bentoml.api
    def delete(self, ids: list[str]) -> Reply:
        return self._reply(lambda index: index.delete(ids))

    @bentoml.api
    def info(self) -> Reply:
        return self._reply(lambda index: index.info())

    @bentoml.api
    def rebuild_index(self, spec: IndexSpec) -> Reply:
        return self._reply(lambda index: index.rebuild_index(spec))

    @bentoml.api
    def health(self) -> Health:
        """Never raises: what /api/status and readiness show when the vector store is down."""
        try:
            self._vectors().ping()
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
    """The ``Embedding`` port over the Embedder service (blocking: call from a worker thread)."""

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy
        self._description: ModelDescription | None = None

    def describe(self) -> ModelDescription:
        if self._description is None:
            with calling("embedder"):
                answer = self._proxy.to_sync.describe()
            self._description = ModelDescription.model_validate(answer, from_attributes=True)
        return self._description

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        with calling("embedder"):
            return self._proxy.to_sync.embed(pixels=pixels)


class RemoteVectors:
    """The ``VectorStore`` port over the VectorSearch service (blocking: call from a worker thread)."""

    def __init__(self, proxy: Any) -> None:
        self._proxy = proxy

    def _call(self, kind: Any, call: Callable[[Any], Any]) -> Any:
        with calling("vector-search"):
            answer = call(self._proxy.to_sync)
        return Reply.model_validate(answer, from_attributes=True).unwrap(kind)

    def ensure_ready(self) -> None:
        self.ping()

    def ping(self) -> None:
        with calling("vector-search"):
            health = Health.model_validate(self._proxy.to_sync.health(), from_attributes=True)
        if health.error is not None:
            raise health.error.to_exception()

    def existing_ids(self, ids: list[str]) -> set[str]:
        return self._call(set[str], lambda client: client.existing_ids(ids=ids))

    def get(self, ids: list[str]) -> list[ImageMetadata]:
        return self._call(list[ImageMetadata], lambda client: client.get(ids=ids))

    def get_vector(self, image_id: str) -> list[float] | None:
        return self._call(list[float] | None, lambda client: client.get_vector(image_id=image_id))

    def upsert(self, records: list[VectorRecord]) -> int:
        return self._call(int, lambda client: client.upsert(records=records))

    def search(self, query: VectorQuery) -> list[VectorHit]:
        return self._call(list[VectorHit], lambda client: client.search(query=query))

    def delete(self, ids: list[str]) -> int:
        return self._call(int, lambda client: client.delete(ids=ids))

    def count(self) -> int:
        return self.info().count

    def info(self) -> IndexInfo:
        return self._call(IndexInfo, lambda client: client.info())

    def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        return self._call(IndexInfo, lambda client: client.rebuild_index(spec=spec))

    def flush(self) -> None:
        """Milvus seals segments by itself; the service has no bulk writes to seal."""


# --- the HTTP edge ----------------------------------------------------------------------------------

# The one table from domain errors to HTTP statuses (the most specific class wins).
HTTP_STATUS: dict[type[SearchError], int] = {
    InvalidRequest: 400,
    UrlFetchFailed: 400,
    NotFound: 404,
    ModelMismatch: 409,
    ImageTooLarge: 413,
    UnsupportedImageFormat: 415,
    InvalidImage: 422,
    SearchError: 500,
    ModelUnavailable: 503,
    BackendUnavailable: 503,
}


def http_status(error: SearchError) -> int:
    return next(HTTP_STATUS[cls] for cls in type(error).__mro__ if cls in HTTP_STATUS)


app = FastAPI(
    title="Reverse image search",
    description="Upload a photo, get the most similar images. Errors are JSON: {error, detail}.",
    version="0.1.0",
    docs_url="/docs",
    openapi_url="/openapi.json",
)


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def _read_upload(request: Request, upload: UploadFile, max_bytes: int) -> bytes:
    """Read an upload, refusing oversize bodies without holding them in memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise ImageTooLarge(f"The request is {declared} bytes; the image limit is {max_bytes} bytes.")
    data = await upload.read(max_bytes + 1)
    check_size(len(data), max_bytes)
    return data


@bentoml.service(name="image-search", workers=DEPLOYMENT.services.api_workers, traffic={"timeout": 120})
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
        )
        self.fetcher = UrlFetcher(self.settings.limits.max_upload_bytes, self.settings.limits.url_fetch_timeout_s)

    @bentoml.on_shutdown
    def close_url_fetcher(self) -> None:
        self.fetcher.close()

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
    def _hit(self, hit: VectorHit) -> SearchHit:
        meta = hit.image
        return SearchHit(
            id=meta.id, label=meta.label, score=round(hit.score, 6),
            image_url=self.catalog.direct_url(meta.id, "original") or f"/api/images/{meta.id}",
            thumbnail_url=self.catalog.direct_url(meta.id, "thumbnail") or f"/api/images/{meta.id}/thumbnail",
            width=meta.width, height=meta.height, mime=meta.mime, size_bytes=meta.size_bytes, source=meta.source,
        )

    def _response(self, result: SearchResult) -> SearchResponse:
        return SearchResponse(**result.model_dump(exclude={"hits"}), hits=[self._hit(hit) for hit in result.hits])

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.post("/api/search", response_model=SearchResponse, responses={413: {"model": ErrorResponse}})
    async def search_upload(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description="The query image.")],
        top_k: Annotated[int | None, Form(ge=1)] = None,
        offset: Annotated[int, Form(ge=0)] = 0,
        label: Annotated[str | None, Form(max_length=MAX_LABEL_LENGTH)] = None,
    ) -> SearchResponse:
        """Search with an uploaded image (multipart form)."""
        data = await _read_upload(request, file, self.settings.limits.max_upload_bytes)
        options = SearchOptions(top_k=top_k, offset=offset, label=label or None)
        return self._response(await in_thread(self.catalog.search_image, data, options))

    @app.post("/api/search/url", response_model=SearchResponse)
    async def search_url(self, body: SearchByUrl) -> SearchResponse:
        """Search with an image fetched from an http(s) URL."""
        data = await in_thread(self.fetcher.fetch, body.url)
        return self._response(await in_thread(self.catalog.search_image, data, body))

    @app.post("/api/search/id", response_model=SearchResponse)
    async def search_id(self, body: SearchById) -> SearchResponse:
        """Search with an image already in the collection (no re-embedding)."""
        return self._response(await in_thread(self.catalog.search_stored, body.id, body))

    @app.post("/api/images", response_model=InsertResponse, status_code=201)
    async def insert(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description="The image to add.")],
        label: Annotated[str | None, Form(max_length=MAX_LABEL_LENGTH)] = None,
    ) -> Response:
        """Add one image. Its id is the sha256 of its bytes: adding the same bytes again changes nothing."""
        data = await _read_upload(request, file, self.settings.limits.max_upload_bytes)
        added = await in_thread(self.catalog.add, data, label, file.filename or "upload")
        message = "Added." if added.created else "Already present; nothing changed."
        body = InsertResponse(id=added.id, created=added.created, message=message, image=added.image)
        return JSONResponse(body.model_dump(), status_code=201 if added.created else 200)

    @app.get("/api/images/{image_id}", responses={404: {"model": ErrorResponse}})
    async def get_image(self, image_id: str) -> Response:
        """The original image bytes, streamed from the store (503 when the store is down)."""
        return self._blob_response(*await in_thread(self.catalog.blob, image_id, "original"))

    @app.get("/api/images/{image_id}/thumbnail", responses={404: {"model": ErrorResponse}})
    async def get_thumbnail(self, image_id: str) -> Response:
        return self._blob_response(*await in_thread(self.catalog.blob, image_id, "thumbnail"))

    @staticmethod
    def _blob_response(data: bytes, media_type: str) -> Response:
        # Streamed by the service whatever the store (hits carry presigned URLs for direct access):
        # one URL that always works, and a clear 503 when the store is down.
        # Content-addressed: the bytes behind an id never change.
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=media_type, headers=headers)

    @app.get("/api/images/{image_id}/metadata", response_model=ImageMetadata)
    async def get_metadata(self, image_id: str) -> ImageMetadata:
        return await in_thread(self.catalog.metadata, image_id)

    @app.delete("/api/images/{image_id}", response_model=DeleteResponse)
    async def delete_image(self, image_id: str) -> DeleteResponse:
        """Remove an image, its vector and its thumbnail."""
        await in_thread(self.catalog.remove, image_id)
        return DeleteResponse(id=image_id, deleted=True)

    @app.get("/api/status", response_model=StatusResponse)
    async def status(self) -> StatusResponse:
        """Count, model, index, backends. Answers even when Milvus is down (ready=false)."""
        description = await in_thread(self.remote_embedder.describe)
        info, problems = await in_thread(self.catalog.problems)
        settings = self.settings
        limits = Limits(
            max_upload_bytes=settings.limits.max_upload_bytes,
            max_image_pixels=settings.limits.max_image_pixels,
            max_top_k=settings.limits.max_top_k,
            default_top_k=settings.limits.default_top_k,
            embed_max_batch_size=settings.batching.max_batch_size,
            embed_max_latency_ms=settings.batching.max_latency_ms,
        )
        return StatusResponse(
            ready=not problems,
            count=info.count if info else -1,
            model=description.info,
            device=description.device,
            index=info.index if info else IndexSpec(index_type=settings.milvus.index_type),
            metric=info.metric if info else "COSINE",
            collection=settings.milvus.collection,
            milvus_backend=settings.milvus.backend,
            milvus_uri=settings.milvus.uri,
            store=self.catalog.store.info(),
            limits=limits,
            error="; ".join(problems),
        )

    @app.post("/api/index", response_model=IndexInfo)
    async def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        """(Re)build the vector index with a chosen type and parameters (FLAT, IVF_FLAT, IVF_SQ8, HNSW)."""
        return await in_thread(self.catalog.rebuild_index, spec)

    @app.get("/api/model", response_model=ModelDescription)
    async def model(self) -> ModelDescription:
        """The serving model and preprocessing recipe (the ingest job's --service-url reads this)."""
        return await in_thread(self.remote_embedder.describe)

    @app.post("/api/embed", response_class=Response)
    async def embed(self, request: Request) -> Response:
        """Batch embedding for the ingest job: body and answer are .npy arrays (uint8 pixels in, float32 out)."""
        raw = await request.body()
        try:
            pixels = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidRequest(f"The body must be a .npy array: {exc}") from exc
        vectors, model = await in_thread(self.catalog.embed_pixels, pixels)
        out = io.BytesIO()
        np.save(out, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
        return Response(out.getvalue(), media_type="application/x-npy", headers={"X-Model-Id": model.model_id})


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse(ErrorResponse(error="validation_error", detail=problems).model_dump(), status_code=422)


@app.exception_handler(SearchError)
async def _domain_error(_: Request, exc: SearchError) -> JSONResponse:
    status = http_status(exc)
    if status >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    return JSONResponse(ErrorResponse(error=exc.code, detail=exc.message).model_dump(), status_code=status)
