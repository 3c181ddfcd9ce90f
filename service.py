"""BentoML services: thin edges over the domain (bento/domain/catalog.py and the models/ it uses).

- ``Embedder``: batchable pixels -> vectors (GPU when present), adaptive batching.
- ``VectorSearch``: the single owner of the Milvus connection (Milvus Lite allows one process per file).
- ``ImageSearch``: the entry service; HTTP API (``/api/...``), the web page (``/``) and OpenAPI docs
  (``/docs``). Its routes parse the request, call the catalog (in a worker thread: decoding is CPU work
  and the catalog's calls to the two services above are blocking), and shape the response.

Domain errors cross from a service to its caller as data (``Reply``) and are raised there as the same
class; ``bento.http.errors.HTTP_STATUS`` is the one place they become HTTP statuses. This module only wires: the
services, their APIs and routes; the HTTP edge lives in bento/http/, the adapters in bento/adapters/.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import DType
from fastapi import File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from bento.adapters import npy
from bento.adapters.assembly import open_catalog
from bento.adapters.fetch import UrlFetcher
from bento.adapters.remote import RemoteEmbedder, RemoteVectors, in_worker_threads
from bento.adapters.vectors import VectorIndex, open_indexes
from bento.core.config import get_settings
from bento.core.errors import InvalidRequest, SearchError
from bento.core.metrics import INTERNAL, start_embedder_requests
from bento.core.retry import FAIL_FAST
from bento.domain import schemas
from bento.domain.duplicates import DuplicatePage, DuplicateQuery
from bento.domain.listing import BrowseQuery, LabelList
from bento.http import access, responses
from bento.http.access import Admin, Searcher, Writer
from bento.http.app import add_last_routes, count_requests, make_app
from bento.http.deployment import DEPENDENCY_CONNECTION, embed_batching_options, embedder_resources
from bento.http.responses import in_thread
from models.backbones import Role

logger = logging.getLogger("ris.service")
STATIC_DIR = Path(__file__).parent / "bento" / "static"

# BentoML's decorators take workers, resources, batching and dependency URLs when the classes below are
# defined, so the settings are read at import (validated, and unknown RIS_* variables refused); nothing
# else happens at import: clients and models are made in the services' __init__.
DEPLOYMENT = get_settings()

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
        multipart part. A .npy of uint8 pixels, checked as POST /api/embed checks its body (bento/adapters/npy.py);
        embedded in one call (the caller's batch), not through the adaptive batcher."""
        model = self.embedders.model(role)
        array = npy.pixels_from_npy(pixels.read_bytes(), model.preprocessing.input_sides)
        return model.embed(array)

    @bentoml.api
    def describe(self) -> schemas.ModelDescription:
        """The similarity model and its preprocessing recipe (callers prepare pixels with it)."""
        return self.embedder.describe()

    @bentoml.api
    def describe_copy(self) -> schemas.CopyModel:
        """The copy model and its recipe (description null: none serves)."""
        return schemas.CopyModel(description=self.embedders.describe_copy())


count_requests(Embedder)


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
                embedder = RemoteEmbedder(self.embedder, by_url=bool(self.settings.services.embedder_url))
                copy = embedder.describe_copy()
                similarity, copies = open_indexes(self.settings, embedder.describe().info, copy.info if copy else None)
                self._indexes = {"similarity": similarity, **({"copy": copies} if copies is not None else {})}
            if role not in self._indexes:
                raise InvalidRequest("No copy model serves here, so there is no copy collection.")
            return self._indexes[role]

    def _reply(self, operation: Callable[[VectorIndex], Any], role: Role = "similarity") -> schemas.Reply:
        try:
            return schemas.Reply.of(operation(self._vectors(role)))
        except SearchError as exc:
            return schemas.Reply.failed(exc)

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
    def search(self, query: schemas.VectorQuery, role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.search(query), role)

    @bentoml.api
    def upsert(self, records: list[schemas.VectorRecord], role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.upsert(records), role)

    @bentoml.api
    def get(self, ids: list[str], role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.get(ids), role)

    @bentoml.api
    def get_vector(self, image_id: str, role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.get_vector(image_id), role)

    @bentoml.api
    def existing_ids(self, ids: list[str], role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: sorted(index.existing_ids(ids)), role)

    @bentoml.api
    def delete(self, ids: list[str], role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.delete(ids), role)

    @bentoml.api
    def info(self, role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.info(), role)

    @bentoml.api
    def rebuild_index(self, spec: schemas.IndexSpec, role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.rebuild_index(spec), role)

    @bentoml.api
    def duplicates(self, query: DuplicateQuery, role: Role = "similarity") -> schemas.Reply:
        return self._reply(lambda index: index.duplicates(query), role)

    @bentoml.api
    def browse(self, query: BrowseQuery) -> schemas.Reply:
        return self._reply(lambda index: index.browse(query))

    @bentoml.api
    def labels(self) -> schemas.Reply:
        return self._reply(lambda index: index.labels())

    @bentoml.api
    def health(self, role: Role = "similarity") -> schemas.Health:
        """Never raises: what /api/status and readiness show when the vector store is down."""
        try:
            self._vectors(role).ping()
        except SearchError as exc:
            return schemas.Health(ok=False, error=exc.to_payload())
        return schemas.Health(ok=True)


app, app_routes = make_app(DEPLOYMENT, STATIC_DIR)


# metrics disabled: BentoML's request metrics of this service (bento/core/metrics.py says why) and its /metrics
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
        self.remote_embedder = RemoteEmbedder(self.embedder, by_url=bool(self.settings.services.embedder_url))
        self.remote_vectors = RemoteVectors(self.vectors)
        self.catalog = open_catalog(
            self.settings,
            self.remote_embedder,
            retry=FAIL_FAST,  # a request answers 503 at once; only a dropped connection is retried
            vectors=self.remote_vectors,
            # used where the embedder says a copy model serves (asked lazily: it may be scaled to zero now)
            copies=RemoteVectors(self.vectors, "copy"),
            at_once=in_worker_threads,
        )
        self.fetcher = UrlFetcher(self.settings.fetch, self.settings.limits.max_upload_bytes)
        self.client_limits = access.ClientLimits.from_settings(self.settings.limits)
        start_embedder_requests([*app_routes.all(), INTERNAL])
        loopback = access.listening_on_loopback_only()
        # Exactly what is open, once at start (docs/security.md explains the rules).
        logger.warning("%s (listening on %s).", access.key_table().describe(loopback), "loopback only" if loopback else "a non-loopback address")

    async def __is_ready__(self) -> bool:
        """Model known and the image store reachable (BentoML adds the dependencies' readiness)."""
        try:
            await in_thread(self.remote_embedder.describe)
            await in_thread(self.catalog.store.ping)
        except SearchError as exc:
            logger.warning("not ready: %s", exc.message)
            return False
        return True

    # --- routes ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/ready", include_in_schema=False)
    async def ready(self) -> JSONResponse:
        """This API pod's readiness (the Kubernetes probe): it can serve. Shared backends (Milvus, the image
        store, the embedder) being down does not take it out of the Service (responses.api_ready says why)."""
        ready = await responses.api_ready(self.catalog, self.remote_vectors)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.post("/api/search", response_model=schemas.SearchResponse, responses={413: {"model": schemas.ErrorResponse}})
    async def search_upload(
        self,
        _: Searcher,
        file: Annotated[UploadFile, File(description="The query image.")],
        mode: Annotated[schemas.SearchMode, Form(description="both (copies first, then similar images), copies, or similar.")] = "both",
        top_k: Annotated[int | None, Form(ge=1)] = None,
        offset: Annotated[int, Form(ge=0)] = 0,
        label: Annotated[str | None, Form(max_length=schemas.MAX_LABEL_LENGTH)] = None,
        min_score: Annotated[float | None, Form(ge=-1, le=1)] = None,
    ) -> schemas.SearchResponse:
        """Search with an uploaded image (multipart form)."""
        data = await responses.read_upload(file, self.settings.limits.max_upload_bytes)
        options = schemas.SearchOptions(mode=mode, top_k=top_k, offset=offset, label=label or None, min_score=min_score)
        return responses.search_response(self.catalog, await in_thread(self.catalog.search_image, data, options))

    @app.post("/api/search/url", response_model=schemas.SearchResponse)
    async def search_url(self, request: Request, principal: Searcher, body: schemas.SearchByUrl) -> schemas.SearchResponse:
        """Search with an image fetched from a public http(s) URL (see docs/security.md)."""
        self.client_limits.charge(request, principal, "URL search")
        data = await self.fetcher.fetch(body.url)
        return responses.search_response(self.catalog, await in_thread(self.catalog.search_image, data, body))

    @app.post("/api/search/id", response_model=schemas.SearchResponse)
    async def search_id(self, _: Searcher, body: schemas.SearchById) -> schemas.SearchResponse:
        """Search with an image already in the collection (no re-embedding)."""
        return responses.search_response(self.catalog, await in_thread(self.catalog.search_stored, body.id, body))

    @app.post("/api/images", response_model=schemas.InsertResponse, status_code=201)
    async def insert(
        self,
        request: Request,
        principal: Writer,
        file: Annotated[UploadFile, File(description="The image to add.")],
        label: Annotated[str | None, Form(max_length=schemas.MAX_LABEL_LENGTH)] = None,
    ) -> Response:
        """Add one image (scope `write`). Its id is the sha256 of its bytes: adding the same bytes again changes nothing."""
        self.client_limits.charge(request, principal, "insert")
        data = await responses.read_upload(file, self.settings.limits.max_upload_bytes)
        return responses.insert_response(await in_thread(self.catalog.add, data, label, file.filename or "upload"))

    @app.get("/api/images", response_model=schemas.GalleryPage, responses={202: {"model": schemas.GalleryPage}})
    async def gallery(
        self,
        _: Searcher,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=200)] = 24,
        label: Annotated[str | None, Query(max_length=schemas.MAX_LABEL_LENGTH, description='Only this label ("": images without one).')] = None,
    ) -> Response:
        """The collection, newest first, paged. 202 with state "scanning" while the service first reads its
        listing (a large collection takes a while); writes made through the service show at once."""
        return await responses.gallery_response(self.catalog, offset, limit, label)

    @app.get("/api/labels", response_model=LabelList, responses={202: {"model": LabelList}})
    async def labels(
        self,
        _: Searcher,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> Response:
        """Every label in use and how many images carry it, most used first ("" counts images without one),
        paged like every list (`has_more`, `next_offset`)."""
        labels = await in_thread(self.catalog.labels)
        return responses.labels_page(labels, offset, limit)

    @app.get("/api/images/{image_id}", responses={404: {"model": schemas.ErrorResponse}})
    async def get_image(self, request: Request, _: Searcher, image_id: str) -> Response:
        """The original image bytes, without their GPS location (503 when the store is down)."""
        return await responses.blob_response(self.catalog, request, image_id, "original")

    @app.get("/api/images/{image_id}/thumbnail", responses={404: {"model": schemas.ErrorResponse}})
    async def get_thumbnail(self, request: Request, _: Searcher, image_id: str) -> Response:
        return await responses.blob_response(self.catalog, request, image_id, "thumbnail")

    @app.get("/api/images/{image_id}/metadata", response_model=schemas.ImageMetadata)
    async def get_metadata(self, _: Searcher, image_id: str) -> schemas.ImageMetadata:
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
        return responses.while_not_ready(page, page.state == "ready")

    @app.delete("/api/images/{image_id}", response_model=schemas.DeleteResponse)
    async def delete_image(self, _: Writer, image_id: str) -> schemas.DeleteResponse:
        """Remove an image, its vector and its thumbnail (scope `write`)."""
        await in_thread(self.catalog.remove, image_id)
        return schemas.DeleteResponse(id=image_id, deleted=True)

    @app.get("/api/status", response_model=schemas.StatusResponse, response_model_exclude_none=True)
    async def status(self, principal: Searcher) -> schemas.StatusResponse:
        """Count, model, index, backends. Answers even when Milvus is down (ready=false). Where the
        backends are (URIs, paths, error details) is shown to `admin` keys only."""
        return await responses.status_response(self.catalog, self.remote_embedder, self.settings, principal)

    @app.post("/api/index", response_model=schemas.IndexInfo, response_model_exclude_none=True)
    async def rebuild_index(self, _: Admin, spec: schemas.IndexSpec) -> schemas.IndexInfo:
        """(Re)build the vector index (scope `admin`): FLAT, IVF_FLAT, IVF_SQ8, HNSW; one at a time (409)."""
        return await in_thread(self.catalog.rebuild_index, spec)

    @app.get("/api/model", response_model=schemas.ModelDescription, responses={404: {"model": schemas.ErrorResponse}})
    async def model(self, _: Searcher, role: Role = "similarity") -> schemas.ModelDescription:
        """A serving model and its preprocessing recipe (the ingest job's --service-url reads this): the
        similarity model, or with role=copy the copy model (404: none serves)."""
        return await responses.serving_model(self.catalog, self.remote_embedder, role)

    @app.post("/api/embed", response_class=Response)
    async def embed(self, request: Request, principal: Admin, role: Role = "similarity") -> Response:
        """Batch embedding for the ingest job (scope `admin`): .npy uint8 pixels in, .npy float32 vectors out,
        by the similarity model or (role=copy) the copy model; pixels of another recipe version are refused (409)."""
        return await responses.embed_response(self.catalog, self.remote_embedder, request, role)


# Last: /metrics and the catch-all that keeps unknown routes in the JSON error shape.
add_last_routes(app)
