"""The one way to build the catalog from settings, used by the services, the ingest job and every tool:
the settings decide the limits, thumbnails, verdict thresholds and where the vectors and blobs live."""

from __future__ import annotations

from bento.adapters.storage import open_image_store
from bento.adapters.vectors import open_indexes
from bento.core.config import Settings
from bento.core.retry import FAIL_FAST, RetryPolicy
from bento.domain.catalog import Catalog
from bento.domain.ports import AtOnce, Embedding, ImageStore, VectorStore


def open_catalog(
    settings: Settings,
    embedding: Embedding,
    *,
    retry: RetryPolicy = FAIL_FAST,
    vectors: VectorStore | None = None,
    copies: VectorStore | None = None,
    store: ImageStore | None = None,
    at_once: AtOnce | None = None,
) -> Catalog:
    """A catalog over ``vectors``/``copies`` when given (the API service's RPC clients of VectorSearch,
    the re-embedding job's own collections), else over the Milvus collections the settings name, opened
    in this process (the ingest job, tools, tests); blobs in ``store`` or the settings' image store."""
    if vectors is None:
        copy_model = retry.call(embedding.describe_copy)
        vectors, copies = open_indexes(settings, retry.call(embedding.describe).info, copy_model.info if copy_model else None)
    return Catalog(
        vectors, store or open_image_store(settings), embedding, settings, copies=copies, retry=retry, at_once=at_once
    )
