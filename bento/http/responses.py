"""What the routes answer: uploads read and checked, hits and cards with their image URLs, the status page, blobs
with their cache headers, the embedding endpoint (.npy in, .npy out); blocking work in worker threads."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import anyio
import numpy as np
from fastapi import Request, UploadFile
from fastapi.responses import JSONResponse, Response

from bento.adapters import npy
from bento.adapters.remote import RemoteVectors
from bento.core.config import Settings
from bento.core.errors import (
    NotFound,
    SearchError,
)
from bento.core.metrics import record_backend
from bento.domain.catalog import Added, Catalog, SearchResult
from bento.domain.listing import LabelList
from bento.domain.ports import Embedding, Kind
from bento.domain.schemas import (
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
    next_page,
)
from bento.http.access import key_table
from bento.http.auth import Principal
from models.backbones import Role
from models.imaging import check_size

logger = logging.getLogger("ris.service")
P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """Read an upload (its body already bounded by EdgeGuard) and check its size."""
    data = await upload.read(max_bytes + 1)
    check_size(len(data), max_bytes)
    return data


def while_not_ready(body: Any, ready: bool) -> JSONResponse:
    """A result computed in the background: 200 once it is ready, 202 (with its state) until then."""
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 202)


def labels_page(labels: LabelList, offset: int, limit: int) -> JSONResponse:
    """A page of the label list (the list is held whole by the listing: labels are far fewer than images)."""
    chosen = labels.labels[offset : offset + limit]
    page = labels.model_copy(
        update={"labels": chosen, "total": len(labels.labels), "offset": offset,
                **next_page(offset, len(chosen), offset + len(chosen) < len(labels.labels))}
    )
    return while_not_ready(page, page.state == "ready")


async def api_ready(catalog: Catalog, vectors: RemoteVectors) -> bool:
    """This API pod's readiness: whether it can serve, i.e. its own vector-search service answers. Milvus
    and the image store are shared by every API pod: were readiness tied to them, one Milvus restart would
    take every pod out of the Service at once, and with them the page, /docs, /api/status and the reads of
    images already in the store. Their health is recorded instead (ris_backend_up, /api/status, the
    alerts) and the routes that need them answer 503 with Retry-After meanwhile. The embedder is left out
    likewise (upload searches answer 503 while none runs)."""
    try:
        health = await in_thread(vectors.health)
    except SearchError as exc:  # the call itself failed: this pod's vector-search service does not answer
        logger.warning("not ready: %s", exc.message)
        return False
    record_backend("milvus", health.ok)
    try:
        await in_thread(catalog.store.ping)
    except SearchError as exc:
        logger.warning("image store unavailable: %s", exc.message)
        record_backend("store", False)
    else:
        record_backend("store", True)
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
        state=page.state, total=page.total, offset=offset, limit=limit, label=label, as_of=page.as_of,
        images=[ImageCard(**card(catalog, meta)) for meta in page.images],
        **next_page(offset, len(page.images), offset + len(page.images) < page.total),
    )
    return while_not_ready(body, page.state == "ready")


def insert_response(added: Added) -> JSONResponse:
    """201 for a new image, 200 for bytes already stored (nothing changed)."""
    message = "Added." if added.created else "Already present; nothing changed."
    body = InsertResponse(id=added.id, created=added.created, message=message, image=added.image)
    return JSONResponse(body.model_dump(mode="json"), status_code=201 if added.created else 200)


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
        image_count=info.image_count if info else -1,
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
    """POST /api/embed: .npy uint8 pixels in, .npy float32 vectors out (``X-Recipe-Version``: the recipe the
    client prepared them with, checked by the catalog)."""
    recipe = (await serving_model(catalog, embedding, role)).preprocessing
    pixels = npy.pixels_from_npy(await request.body(), recipe.input_sides, request.headers.get("content-type", ""))
    vectors, model = await in_thread(catalog.embed_pixels, pixels, role, request.headers.get("x-recipe-version"))
    body = npy.to_npy(np.asarray(vectors, dtype=np.float32))
    return Response(body, media_type=npy.MEDIA_TYPE, headers={"X-Model-Id": model.model_id})
