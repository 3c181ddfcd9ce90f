"""Adapters: the catalog's ports (``Embedding``, ``VectorStore``) over the Embedder and VectorSearch services,
called from a request's worker thread (BentoML's ``to_sync`` clients); transport failures become domain errors."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
from bentoml.exceptions import BentoMLException

from bento.adapters import npy
from bento.core.errors import BackendUnavailable, ConnectionDropped
from bento.core.metrics import count_embedder_request
from bento.domain.duplicates import DuplicatePage, DuplicateQuery
from bento.domain.listing import BrowsePage, BrowseQuery, LabelList
from bento.domain.schemas import (
    CopyModel,
    Health,
    ImageMetadata,
    IndexInfo,
    IndexSpec,
    ModelDescription,
    Reply,
    VectorHit,
    VectorQuery,
    VectorRecord,
)
from models.backbones import Role


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

    def __init__(self, proxy: Any, by_url: bool = False) -> None:
        """``by_url``: the embedder is its own deployment (RIS_SERVICES_EMBEDDER_URL), reached over HTTP."""
        self._proxy = proxy
        self._by_url = by_url
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
        if not self._by_url:  # inside one `bentoml serve`: binary, adaptive batching
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
            file.write(npy.to_npy(np.asarray(pixels, dtype=np.uint8)))
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

    def health(self) -> Health:
        """The VectorSearch service's answer about its collection: it answering at all is this pod's own
        readiness; what it says about Milvus is the shared backend's health. Raises only when the call
        itself fails (the service does not answer)."""
        with calling("vector-search"):
            return Health.model_validate(self._proxy.to_sync.health(role=self._role), from_attributes=True)

    def ping(self) -> None:
        health = self.health()
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
        return self.info().image_count

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


# The inner calls' own thread budget. The request itself holds a thread of AnyIO's default pool (40) while it
# waits for them; were they drawn from the same pool, 40 searches at once would hold every thread, each
# waiting for inner calls that could never start. Made in the event loop on first use (AnyIO needs one).
_INNER_THREADS = 40
_inner_limiter: anyio.CapacityLimiter | None = None


def in_worker_threads(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Two calls at the same time from a request's worker thread (the catalog's search: the similarity
    embedding and search, and the copy collection's search): each in an AnyIO worker thread, where the
    dependency clients (``to_sync``) work; an error of either is raised here as it was (no exception group)."""
    outcomes: list[tuple[bool, Any]] = [(True, None), (True, None)]

    async def run(index: int, call: Callable[[], Any]) -> None:
        global _inner_limiter
        if _inner_limiter is None:
            _inner_limiter = anyio.CapacityLimiter(_INNER_THREADS)
        try:
            outcomes[index] = (True, await anyio.to_thread.run_sync(call, limiter=_inner_limiter))
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
