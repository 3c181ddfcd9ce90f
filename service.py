"""BentoML services: thin HTTP and RPC edges over the domain in bento/ and models/.

- ``Embedder``: batchable pixels -> vectors (GPU when present), adaptive batching.
- ``VectorSearch``: the single owner of the Milvus connection (Milvus Lite allows one process per file).
- ``ImageSearch``: the entry service; HTTP API (``/api/...``), the web page (``/``) and OpenAPI docs
  (``/docs``), composed with the two above through ``bentoml.depends``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import anyio
import bentoml
import httpx
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from bento.config import Settings, get_settings
from bento.errors import (
    BackendUnavailable,
    ImageTooLarge,
    InvalidRequest,
    ModelMismatch,
    NotFound,
    SearchError,
    UrlFetchFailed,
)
from bento.imaging import DecodeLimits, check_size
from bento.schemas import (
    MAX_LABEL_LENGTH,
    DeleteResponse,
    ErrorResponse,
    ImageMetadata,
    IndexInfo,
    IndexSpec,
    InsertResponse,
    ModelInfo,
    SearchById,
    SearchByUrl,
    SearchHit,
    SearchResponse,
    StatusResponse,
    Timings,
    VectorHit,
    VectorQuery,
    VectorRecord,
)
from bento.storage import open_image_store, validate_image_id
from bento.vectors import VectorIndex
from models.pipeline import PreparedImage, prepare_image
from models.preprocess import Preprocessing

logger = logging.getLogger("ris.service")
T = TypeVar("T")
STATIC_DIR = Path(__file__).parent / "bento" / "static"

# Reading configuration at import is fine; building clients or models is not (they start in __init__).
SETTINGS = get_settings()


# How callers of a service pool their connections to it. BentoML 1.4.40 replaces the session every 100
# requests (its default) and closes the old one under in-flight calls (bentoml/BentoML#5540): recycle
# rarely; call_dependency() retries the rare call that still meets a recycled session.
DEPENDENCY_CONNECTION = {"max_requests": 1_000_000_000, "max_age": 3600.0}


def _embedder_resources() -> dict[str, Any]:
    gpus = SETTINGS.embedder_gpus
    if gpus < 0:
        gpus = 1 if shutil.which("nvidia-smi") else 0
    return {"gpu": gpus} if gpus else {}


def embed_batching_options(settings: Settings) -> dict[str, Any]:
    """Adaptive batching of the embed API (README: "Adaptive batching"); off = one model call per request."""
    if not settings.embed_batching:
        return {}
    return {
        "batchable": True,
        "batch_dim": 0,
        "max_batch_size": settings.embed_max_batch_size,
        "max_latency_ms": settings.embed_max_latency_ms,
    }


@contextlib.contextmanager
def domain_errors_as_http() -> Iterator[None]:
    """Inside RPC services: let a domain error cross to the caller with its status code."""
    try:
        yield
    except SearchError as exc:
        raise BentoMLException(exc.message, error_code=HTTPStatus(exc.status_code)) from exc


@bentoml.service(
    name="embedder",
    workers=1,
    resources=_embedder_resources(),
    traffic={"timeout": 120, "max_concurrency": 256},
    runner_connection=DEPENDENCY_CONNECTION,
)
class Embedder:
    """Embeds preprocessed pixels. Loads the model from the BentoML model store and warms it up."""

    def __init__(self) -> None:
        from models.store import load_embedder

        self.embedder = load_embedder(get_settings())
        self.embedder.warm_up()

    @bentoml.api(**embed_batching_options(SETTINGS))
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(N, crop, crop, 3) uint8 -> (N, dim) float32 unit vectors."""
        with domain_errors_as_http():
            return self.embedder.embed(pixels)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """The serving model and its preprocessing recipe (callers prepare pixels with it)."""
        return {
            "info": self.embedder.info.model_dump(),
            "preprocessing": self.embedder.preprocessing.to_dict(),
            "device": self.embedder.device_name,
        }


@bentoml.service(name="vector-search", workers=1, traffic={"timeout": 600}, runner_connection=DEPENDENCY_CONNECTION)
class VectorSearch:
    """Owns the one Milvus connection. Opens the collection lazily, once the model is known."""

    embedder = bentoml.depends(Embedder, url=SETTINGS.embedder_url or None)

    def __init__(self) -> None:
        self.settings = get_settings()
        self._index: VectorIndex | None = None
        # Readiness probes and first requests arrive together; only one of them may open the index
        # (a second opener of a Milvus Lite file would find it locked).
        self._index_lock = threading.Lock()

    def _vectors(self) -> VectorIndex:
        with self._index_lock:
            if self._index is None:
                try:
                    description = self.embedder.describe()
                except BentoMLException as exc:
                    raise BackendUnavailable(f"The embedder is not available yet: {exc}") from exc
                self._index = VectorIndex(self.settings, ModelInfo.model_validate(description["info"]))
            return self._index

    def __is_ready__(self) -> bool:
        try:
            self._vectors().ping()
        except SearchError as exc:
            logger.warning("vector search not ready: %s", exc.message)
            return False
        return True

    @bentoml.on_shutdown
    def close(self) -> None:
        if self._index is not None:
            self._index.close()

    @bentoml.api
    def search(self, query: VectorQuery) -> list[VectorHit]:
        with domain_errors_as_http():
            return self._vectors().search(query)

    @bentoml.api
    def upsert(self, records: list[VectorRecord]) -> int:
        with domain_errors_as_http():
            return self._vectors().upsert(records)

    @bentoml.api
    def get(self, ids: list[str]) -> list[ImageMetadata]:
        with domain_errors_as_http():
            return self._vectors().get(ids)

    @bentoml.api
    def get_vector(self, image_id: str) -> list[float] | None:
        with domain_errors_as_http():
            return self._vectors().get_vector(image_id)

    @bentoml.api
    def existing_ids(self, ids: list[str]) -> list[str]:
        with domain_errors_as_http():
            return sorted(self._vectors().existing_ids(ids))

    @bentoml.api
    def delete(self, ids: list[str]) -> int:
        with domain_errors_as_http():
            return self._vectors().delete(ids)

    @bentoml.api
    def info(self) -> IndexInfo:
        with domain_errors_as_http():
            return self._vectors().info()

    @bentoml.api
    def health(self) -> dict[str, Any]:
        """Never raises: what /api/status shows when the vector store is down."""
        try:
            self._vectors().ping()
        except SearchError as exc:
            return {"ok": False, "error": exc.message}
        return {"ok": True, "error": ""}

    @bentoml.api
    def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        with domain_errors_as_http():
            vectors = self._vectors()
            vectors.rebuild_index(spec)
            return vectors.info()


# --- the HTTP edge ----------------------------------------------------------------------------------

app = FastAPI(
    title="Reverse image search",
    description="Upload a photo, get the most similar images. Errors are JSON: {error, detail}.",
    version="0.1.0",
    docs_url="/docs",
    openapi_url="/openapi.json",
)


def _remote_error(exc: BentoMLException, dependency: str) -> SearchError:
    status = exc.error_code.value if exc.error_code else 500
    text = str(exc)
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
        body = json.loads(text)
        body = body[0] if isinstance(body, list) else body
        text = body["error"]
    if status == 404:
        return NotFound(text)
    if status == 409:
        return ModelMismatch(text)
    if 400 <= status < 500:
        return InvalidRequest(text)
    return BackendUnavailable(
        f"The {dependency} service failed or is unavailable (HTTP {status}); see GET /api/status and its log."
    )


@contextlib.asynccontextmanager
async def calling(dependency: str) -> AsyncIterator[None]:
    """Map failures of a dependent service to domain errors (4xx kept, the rest 503)."""
    try:
        yield
    except BentoMLException as exc:
        raise _remote_error(exc, dependency) from exc
    except (TimeoutError, OSError, aiohttp.ClientError) as exc:
        raise BackendUnavailable(f"The {dependency} service is unreachable: {exc}") from exc


def _connection_dropped(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientConnectionError) or (
        isinstance(exc, RuntimeError) and "Session is closed" in str(exc)
    )


async def call_dependency(dependency: str, method: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
    """One call to a dependent service, retried once if its connection was dropped under it.

    BentoML 1.4.40's inter-service client replaces its HTTP session (see DEPENDENCY_CONNECTION) and
    closes the old one under the calls still in flight on it (bentoml/BentoML#5540, #5698): under
    concurrent load that failed a burst of requests with 500s. Every API called through here is
    idempotent (embed, search, get, upsert by content id, delete), so one retry on a fresh session is safe.
    """
    async with calling(dependency):
        try:
            return await method(**kwargs)
        except (aiohttp.ClientConnectionError, RuntimeError) as exc:
            if not _connection_dropped(exc):
                raise
            logger.info("%s connection dropped (%s); retrying once", dependency, exc)
        return await method(**kwargs)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _clean_label(label: str | None) -> str:
    label = (label or "").strip()
    if len(label) > MAX_LABEL_LENGTH or any(ord(ch) < 32 for ch in label):
        raise InvalidRequest(f"A label is at most {MAX_LABEL_LENGTH} printable characters.")
    return label


async def _read_upload(request: Request, upload: UploadFile, max_bytes: int) -> bytes:
    """Read an upload, refusing oversize bodies without holding them in memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise ImageTooLarge(f"The request is {declared} bytes; the image limit is {max_bytes} bytes.")
    data = await upload.read(max_bytes + 1)
    check_size(len(data), max_bytes)
    return data


@bentoml.service(name="image-search", workers=SETTINGS.api_workers, traffic={"timeout": 120})
@bentoml.asgi_app(app, path="/")
class ImageSearch:
    """The HTTP API and the web page."""

    embedder = bentoml.depends(Embedder, url=SETTINGS.embedder_url or None)
    vectors = bentoml.depends(VectorSearch, url=SETTINGS.vector_search_url or None)

    def __init__(self) -> None:
        self.settings = get_settings()
        self.store = open_image_store(self.settings)
        self.limits = DecodeLimits(self.settings.max_upload_bytes, self.settings.max_image_pixels)
        self._model: ModelInfo | None = None
        self._preprocessing: Preprocessing | None = None
        self._device = ""
        self._http: httpx.AsyncClient | None = None

    # --- helpers ---------------------------------------------------------------------------------
    async def _model_description(self) -> tuple[ModelInfo, Preprocessing]:
        if self._model is None or self._preprocessing is None:
            description = await call_dependency("embedder", self.embedder.to_async.describe)
            self._model = ModelInfo.model_validate(description["info"])
            self._preprocessing = Preprocessing.from_dict(description["preprocessing"])
            self._device = description["device"]
        return self._model, self._preprocessing

    async def _prepare(self, data: bytes, thumbnail: bool) -> PreparedImage:
        _, preprocessing = await self._model_description()
        size = self.settings.thumbnail_size if thumbnail else None
        return await anyio.to_thread.run_sync(
            prepare_image, data, self.limits, preprocessing, size, self.settings.decode_draft_scale
        )

    async def _embed(self, pixels: np.ndarray) -> np.ndarray:
        return await call_dependency("embedder", self.embedder.to_async.embed, pixels=pixels)

    def _urls(self, image_id: str) -> tuple[str, str]:
        original = self.store.presigned_url(image_id, "original") or f"/api/images/{image_id}"
        thumbnail = self.store.presigned_url(image_id, "thumbnail") or f"/api/images/{image_id}/thumbnail"
        return original, thumbnail

    def _hit(self, hit: VectorHit) -> SearchHit:
        image_url, thumbnail_url = self._urls(hit.image.id)
        meta = hit.image
        return SearchHit(
            id=meta.id, label=meta.label, score=round(hit.score, 6), image_url=image_url, thumbnail_url=thumbnail_url,
            width=meta.width, height=meta.height, mime=meta.mime, size_bytes=meta.size_bytes, source=meta.source,
        )

    async def _search_vector(
        self, vector: list[float], query_id: str, top_k: int | None, offset: int, label: str | None,
        started: float, timings: Timings,
    ) -> SearchResponse:
        """The vector search and the response, shared by every way of asking (upload, URL, id)."""
        model, _ = await self._model_description()
        top_k = top_k or self.settings.default_top_k
        if top_k > self.settings.max_top_k:
            raise InvalidRequest(f"top_k is at most {self.settings.max_top_k}.")
        query = VectorQuery(vector=vector, top_k=top_k, offset=offset, label=_clean_label(label) if label else None)
        search_started = time.perf_counter()
        hits = await call_dependency("vector-search", self.vectors.to_async.search, query=query)
        timings.search_ms = _ms(search_started)
        timings.total_ms = _ms(started)
        return SearchResponse(
            query_id=query_id, hits=[self._hit(hit) for hit in hits], top_k=top_k, offset=offset, label=label,
            model=model.model_id, timings=timings,
        )

    async def _search_bytes(self, data: bytes, top_k: int | None, offset: int, label: str | None) -> SearchResponse:
        started = time.perf_counter()
        timings = Timings()
        prepared = await self._prepare(data, thumbnail=False)
        timings.decode_ms = _ms(started)
        embed_started = time.perf_counter()
        vector = (await self._embed(prepared.pixels[None]))[0]
        timings.embed_ms = _ms(embed_started)
        return await self._search_vector(vector.tolist(), prepared.id, top_k, offset, label, started, timings)

    async def _metadata(self, image_id: str) -> ImageMetadata:
        validate_image_id(image_id)
        found = await call_dependency("vector-search", self.vectors.to_async.get, ids=[image_id])
        if not found:
            raise NotFound(f"No image with id {image_id}.")
        return found[0]

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
        data = await _read_upload(request, file, self.settings.max_upload_bytes)
        return await self._search_bytes(data, top_k, offset, label or None)

    @app.post("/api/search/url", response_model=SearchResponse)
    async def search_url(self, body: SearchByUrl) -> SearchResponse:
        """Search with an image fetched from an http(s) URL."""
        data = await self._fetch(body.url)
        return await self._search_bytes(data, body.top_k, body.offset, body.label)

    @app.post("/api/search/id", response_model=SearchResponse)
    async def search_id(self, body: SearchById) -> SearchResponse:
        """Search with an image already in the collection (no re-embedding)."""
        started = time.perf_counter()
        vector = await call_dependency("vector-search", self.vectors.to_async.get_vector, image_id=body.id)
        if vector is None:
            raise NotFound(f"No image with id {body.id}.")
        return await self._search_vector(vector, body.id, body.top_k, body.offset, body.label, started, Timings())

    @app.post("/api/images", response_model=InsertResponse, status_code=201)
    async def insert(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description="The image to add.")],
        label: Annotated[str | None, Form(max_length=MAX_LABEL_LENGTH)] = None,
    ) -> Response:
        """Add one image. Its id is the sha256 of its bytes: adding the same bytes again changes nothing."""
        data = await _read_upload(request, file, self.settings.max_upload_bytes)
        clean_label = _clean_label(label)
        prepared = await self._prepare(data, thumbnail=True)
        existing = await call_dependency("vector-search", self.vectors.to_async.get, ids=[prepared.id])
        if existing:
            # Repair a store that lost the blob (e.g. a crash between the two writes), then report.
            await anyio.to_thread.run_sync(prepared.store_blobs, self.store)
            body = InsertResponse(id=prepared.id, created=False, message="Already present; nothing changed.", image=existing[0])
            return JSONResponse(body.model_dump(), status_code=200)
        vector = (await self._embed(prepared.pixels[None]))[0]
        record = prepared.record(vector, clean_label, (file.filename or "upload")[:200], int(time.time()))
        await anyio.to_thread.run_sync(prepared.store_blobs, self.store)
        await call_dependency("vector-search", self.vectors.to_async.upsert, records=[record])
        body = InsertResponse(
            id=prepared.id, created=True, message="Added.", image=ImageMetadata(**record.model_dump(exclude={"vector"}))
        )
        return JSONResponse(body.model_dump(), status_code=201)

    @app.get("/api/images/{image_id}", responses={404: {"model": ErrorResponse}})
    async def get_image(self, image_id: str) -> Response:
        """The original image bytes, streamed from the store (503 when the store is down)."""
        meta = await self._metadata(image_id)
        return await self._blob_response(meta, "original")

    @app.get("/api/images/{image_id}/thumbnail", responses={404: {"model": ErrorResponse}})
    async def get_thumbnail(self, image_id: str) -> Response:
        meta = await self._metadata(image_id)
        return await self._blob_response(meta, "thumbnail")

    @app.get("/api/images/{image_id}/metadata", response_model=ImageMetadata)
    async def get_metadata(self, image_id: str) -> ImageMetadata:
        return await self._metadata(image_id)

    async def _blob_response(self, meta: ImageMetadata, kind: str) -> Response:
        # Streamed by the service whatever the store (hits carry presigned URLs for direct access):
        # one URL that always works, and a clear 503 when the store is down.
        data = await anyio.to_thread.run_sync(self.store.get, meta.id, kind)
        media_type = meta.mime if kind == "original" else "image/jpeg"
        # Content-addressed: the bytes behind an id never change.
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=media_type, headers=headers)

    @app.delete("/api/images/{image_id}", response_model=DeleteResponse)
    async def delete_image(self, image_id: str) -> DeleteResponse:
        """Remove an image, its vector and its thumbnail."""
        validate_image_id(image_id)
        removed = await call_dependency("vector-search", self.vectors.to_async.delete, ids=[image_id])
        had_blob = await anyio.to_thread.run_sync(self.store.exists, image_id, "original")
        await anyio.to_thread.run_sync(self.store.delete, image_id)
        if not removed and not had_blob:
            raise NotFound(f"No image with id {image_id}.")
        return DeleteResponse(id=image_id, deleted=True)

    @app.get("/api/status", response_model=StatusResponse)
    async def status(self) -> StatusResponse:
        """Count, model, index, backends. Answers even when Milvus is down (ready=false)."""
        model, _ = await self._model_description()
        health = await call_dependency("vector-search", self.vectors.to_async.health)
        info = await call_dependency("vector-search", self.vectors.to_async.info) if health["ok"] else None
        problems = [] if health["ok"] else [health["error"]]
        try:
            await anyio.to_thread.run_sync(self.store.ping)
        except SearchError as exc:
            problems.append(exc.message)
        limits = {
            "max_upload_bytes": self.settings.max_upload_bytes,
            "max_image_pixels": self.settings.max_image_pixels,
            "max_top_k": self.settings.max_top_k,
            "default_top_k": self.settings.default_top_k,
            "embed_max_batch_size": self.settings.embed_max_batch_size,
            "embed_max_latency_ms": self.settings.embed_max_latency_ms,
        }
        return StatusResponse(
            ready=not problems,
            count=info.count if info else -1,
            model=model,
            device=self._device,
            index=info.index if info else IndexSpec(index_type=self.settings.index_type),
            metric=info.metric if info else "COSINE",
            collection=self.settings.collection,
            milvus_backend=self.settings.milvus_backend,
            milvus_uri=self.settings.milvus_uri,
            store=self.store.info(),
            limits=limits,
            error="; ".join(problems),
        )

    @app.post("/api/index", response_model=IndexInfo)
    async def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        """(Re)build the vector index with a chosen type and parameters (FLAT, IVF_FLAT, IVF_SQ8, HNSW)."""
        async with calling("vector-search"):
            return await self.vectors.to_async.rebuild_index(spec=spec)

    @app.get("/api/model")
    async def model(self) -> dict[str, Any]:
        """The serving model and preprocessing recipe (the ingest job's --service-url reads this)."""
        return await call_dependency("embedder", self.embedder.to_async.describe)

    @app.post("/api/embed", response_class=Response)
    async def embed(self, request: Request) -> Response:
        """Batch embedding for the ingest job: body and answer are .npy arrays (uint8 pixels in, float32 out)."""
        _, preprocessing = await self._model_description()
        raw = await request.body()
        try:
            pixels = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidRequest(f"The body must be a .npy array: {exc}") from exc
        crop = preprocessing.crop
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (crop, crop, 3) or len(pixels) > 1024:
            raise InvalidRequest(f"Expected uint8 pixels of shape (N<=1024, {crop}, {crop}, 3), got {pixels.dtype} {pixels.shape}.")
        vectors = await self._embed(pixels)
        out = io.BytesIO()
        np.save(out, np.asarray(vectors, dtype=np.float32), allow_pickle=False)
        return Response(out.getvalue(), media_type="application/x-npy", headers={"X-Model-Id": self._model.model_id if self._model else ""})

    def _url_client(self) -> httpx.AsyncClient:
        """One pooled client for search-by-URL downloads, made on first use."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.settings.url_fetch_timeout_s, follow_redirects=True, max_redirects=3
            )
        return self._http

    @bentoml.on_shutdown
    async def close_url_client(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _fetch(self, url: str) -> bytes:
        if not url.lower().startswith(("http://", "https://")):
            raise InvalidRequest("Only http(s) URLs can be fetched.")
        limit = self.settings.max_upload_bytes
        try:
            async with self._url_client().stream("GET", url) as response:
                if response.status_code != 200:
                    raise UrlFetchFailed(f"Fetching the URL answered HTTP {response.status_code}.")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise ImageTooLarge(f"The image at the URL is over the {limit}-byte limit.")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise UrlFetchFailed(f"Fetching the URL failed: {exc.__class__.__name__}: {exc}") from exc
        return b"".join(chunks)

    async def __is_ready__(self) -> bool:
        """Model known and the image store reachable (BentoML adds the dependencies' readiness)."""
        try:
            await self._model_description()
            await anyio.to_thread.run_sync(self.store.ping)
        except SearchError as exc:
            logger.warning("not ready: %s", exc.message)
            return False
        return True


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": "validation_error", "detail": problems}, status_code=422)


@app.exception_handler(SearchError)
async def _domain_error(_: Request, exc: SearchError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status_code)
