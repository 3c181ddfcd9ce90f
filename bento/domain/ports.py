"""What the domain needs from the outside, as protocols the adapters implement (bento/adapters/): where
vectors come from (the embedder in-process or the Embedder service), the vector collections (Milvus
in-process or the VectorSearch service) and the blob store (a local directory or MinIO/S3).

VectorStore is the one declaration of the vector operations: the Milvus adapter, the VectorSearch
service's API and its RPC client are checked against it (tests/test_layout.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np

from bento.domain.duplicates import DuplicatePage, DuplicateQuery
from bento.domain.listing import BrowsePage, BrowseQuery, LabelList
from bento.domain.schemas import (
    ImageMetadata,
    IndexInfo,
    IndexSpec,
    ModelDescription,
    StoreInfo,
    VectorHit,
    VectorQuery,
    VectorRecord,
)
from models.backbones import Role

Kind = Literal["original", "thumbnail"]
# Milvus returns at most this many rows per query (offset + limit): deeper pages are refused.
MAX_WINDOW = 16384
# Runs two independent calls at the same time and returns both results (raising the first one's error).
AtOnce = Callable[[Callable[[], Any], Callable[[], Any]], tuple[Any, Any]]


class ImageStore(Protocol):
    """What the service and the ingest job need from a blob store (local directory, MinIO/S3)."""

    def put(self, image_id: str, kind: Kind, data: bytes) -> None:
        """Store idempotently: putting the same id twice leaves one object."""

    def get(self, image_id: str, kind: Kind) -> bytes:
        """Raise NotFound when absent."""

    def exists(self, image_id: str, kind: Kind) -> bool: ...

    def delete(self, image_id: str) -> None:
        """Remove the original and the thumbnail; absent objects are fine."""

    def presigned_url(self, image_id: str, kind: Kind) -> str | None:
        """A direct URL to the object, or None when the service must stream it itself."""

    def ping(self) -> None:
        """Raise BackendUnavailable when the store cannot be reached."""

    def info(self) -> StoreInfo: ...


class Embedding(Protocol):
    """Where vectors come from."""

    def describe(self) -> ModelDescription:
        """The similarity model and its preprocessing recipe (cached by implementations: it never changes)."""

    def describe_copy(self) -> ModelDescription | None:
        """The copy model and its recipe, or None when no copy model serves (cached likewise)."""

    def embed(self, pixels: np.ndarray, role: Role = "similarity") -> np.ndarray:
        """(N, side, side, 3) uint8 -> (N, dim) float32 unit vectors of ``role``'s model; side: one of that
        model's recipe's input sides."""


class VectorStore(Protocol):
    """The vector collection, with the image metadata kept beside each vector."""

    def ensure_ready(self) -> None: ...

    def ping(self) -> None:
        """Raise BackendUnavailable when the collection cannot serve."""

    def existing_ids(self, ids: list[str]) -> set[str]: ...

    def get(self, ids: list[str]) -> list[ImageMetadata]: ...

    def get_vector(self, image_id: str) -> list[float] | None: ...

    def upsert(self, records: list[VectorRecord]) -> int: ...

    def search(self, query: VectorQuery) -> list[VectorHit]: ...

    def delete(self, ids: list[str]) -> int: ...

    def count(self) -> int: ...

    def info(self) -> IndexInfo: ...

    def rebuild_index(self, spec: IndexSpec) -> IndexInfo: ...

    def flush(self) -> None: ...

    def duplicates(self, query: DuplicateQuery) -> DuplicatePage:
        """A page of the duplicate report (computed in the background; state "running" meanwhile)."""

    def browse(self, query: BrowseQuery) -> BrowsePage:
        """A page of the collection, newest first (state "scanning" until its listing is first read)."""

    def labels(self) -> LabelList:
        """The labels in use with their counts, most used first."""

    def close(self) -> None:
        """Release the connection this store holds, if it holds one."""
