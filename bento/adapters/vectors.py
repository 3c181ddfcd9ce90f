"""The vector index: one Milvus collection holding vectors and image metadata.

Works the same on a Milvus Lite file and on a Milvus server (pymilvus ``MilvusClient``). The
collection's properties record which model made its vectors; opening it with another model is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import ConnectError, MilvusException, MilvusUnavailableException

from bento.core.config import Settings
from bento.core.errors import BackendUnavailable, Conflict, InvalidRequest, MilvusLiteLocked, ModelMismatch, SearchError
from bento.domain.duplicates import (
    DuplicatePage,
    DuplicateQuery,
    DuplicateReport,
    DuplicateScans,
    ImageVector,
    find_duplicates,
)
from bento.domain.listing import BrowsePage, BrowseQuery, CollectionListing, LabelList, ListedImage
from bento.domain.ports import MAX_WINDOW
from bento.domain.schemas import (
    MAX_LABEL_LENGTH,
    ImageMetadata,
    IndexInfo,
    IndexSpec,
    ModelInfo,
    VectorHit,
    VectorQuery,
    VectorRecord,
)

try:  # Milvus Lite is optional: a server deployment does not install it.
    from milvus_lite.exceptions import MilvusLiteError

    _LITE_ERRORS: tuple[type[Exception], ...] = (MilvusLiteError,)
except ImportError:
    _LITE_ERRORS = ()

logger = logging.getLogger(__name__)
T = TypeVar("T")

METRIC = "COSINE"  # vectors are unit length: cosine == inner product, scores read as similarity
# 2: one row per stored view of an image (key = id for the main view, id:k for extra view k), grouped by id.
SCHEMA_VERSION = "2"
MAX_SOURCE_BYTES = 1024
# Milvus refuses an insert over 64 MB; stay well under it.
MAX_UPSERT_BYTES = 16 * 1024 * 1024
# Loading a large collection or building its index legitimately takes longer than one query.
LOAD_TIMEOUT_S = 300.0

DEFAULT_INDEX_PARAMS: dict[str, dict[str, int]] = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 1024},
    "IVF_SQ8": {"nlist": 1024},
    "HNSW": {"M": 16, "efConstruction": 200},
}
METADATA_FIELDS = ["label", "mime", "width", "height", "size_bytes", "source", "created_at"]
HIT_FIELDS = ["id", *METADATA_FIELDS]
MAIN_VIEW = "view == 0"
_P = "ris."  # collection property prefix


# Sane ranges of the build parameters, checked before anything is dropped: Milvus accepts far more
# (HNSW M up to 2048), which only costs memory and build time without better recall here.
PARAM_BOUNDS: dict[str, tuple[int, int]] = {"nlist": (1, 65536), "M": (4, 64), "efConstruction": (8, 512)}


def index_spec(index_type: str, params: dict[str, int] | None = None) -> IndexSpec:
    if index_type not in DEFAULT_INDEX_PARAMS:
        raise InvalidRequest(f"Index type {index_type} is not supported; use one of {', '.join(DEFAULT_INDEX_PARAMS)}.")
    merged = {**DEFAULT_INDEX_PARAMS[index_type], **(params or {})}
    unknown = set(merged) - set(DEFAULT_INDEX_PARAMS[index_type])
    if unknown:
        raise InvalidRequest(f"Unknown parameters for {index_type}: {', '.join(sorted(unknown))}.")
    for name, value in merged.items():
        low, high = PARAM_BOUNDS[name]
        if isinstance(value, bool) or not low <= value <= high:
            raise InvalidRequest(f"{index_type} parameter {name} must be between {low} and {high}; got {value}.")
    return IndexSpec(index_type=index_type, params=merged)  # type: ignore[arg-type]


def _search_params(spec: IndexSpec, window: int) -> dict[str, Any]:
    if spec.index_type == "HNSW":
        return {"ef": max(64, window)}
    if spec.index_type.startswith("IVF"):
        return {"nprobe": min(spec.params.get("nlist", 1024), 32)}
    return {}


def _truncate_utf8(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")
    return text if len(encoded) <= limit else encoded[:limit].decode("utf-8", errors="ignore")


class _LiteTimestampNoise(logging.Filter):
    """Milvus Lite 3.2 lacks AllocTimestamp, which pymilvus 3 asks for: the call still succeeds but
    grpc logs a full traceback. Drop exactly that record so it cannot hide real errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "Method not implemented" in str(exc))


def _quiet_lite_timestamp_noise() -> None:
    grpc_server_logger = logging.getLogger("grpc._server")
    if not any(isinstance(f, _LiteTimestampNoise) for f in grpc_server_logger.filters):
        grpc_server_logger.addFilter(_LiteTimestampNoise())


def _is_connection_problem(exc: MilvusException) -> bool:
    text = str(exc).lower()
    return exc.code in (1, 2, 503) or any(word in text for word in ("unavailable", "connect", "deadline", "timeout"))


def _string_literal(text: str) -> str:
    """A Milvus expression string literal for any text. Only the backslash and the double quote are
    escaped; everything else stays literal (json.dumps's \\uXXXX escapes, which emoji need, are refused by
    both Milvus Lite and the 2.3 server's parser; checked on both with emoji, quotes and backslashes).
    Labels never hold control characters (bento.domain.catalog.clean_label)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label_filter(label: str) -> str:
    return f"label == {_string_literal(label)}"


def copy_collection(name: str) -> str:
    """The collection of an image collection's copy vectors (the copy model's), joined by the image id.

    A collection of its own rather than a second vector field: the Milvus 2.3 server has one vector field per
    collection, and this way each collection keeps one model, one guard and one index, on every backend."""
    return f"{name}__copy"


def recorded_model(properties: dict[str, str]) -> ModelInfo | None:
    """The model facts a collection records (what its guard compares), or None for a collection this
    product did not make: enough to open it without loading the model (a backup, a restore)."""
    if f"{_P}model_id" not in properties:
        return None
    return ModelInfo(
        backbone=properties[f"{_P}backbone"], model_id=properties[f"{_P}model_id"], dim=int(properties[f"{_P}dim"]),
        preprocessing=properties[f"{_P}preprocessing"], vectors_per_image=int(properties.get(f"{_P}vectors_per_image", "1")),
        weights="as recorded by the collection", pretrained=True,
    )


def open_indexes(settings: Settings, similarity: ModelInfo, copy: ModelInfo | None) -> tuple[VectorIndex, VectorIndex | None]:
    """The similarity collection's index and, where a copy model serves, the copy collection's (connected lazily)."""
    copies = VectorIndex(settings, copy, copy_collection(settings.milvus.collection)) if copy is not None else None
    return VectorIndex(settings, similarity), copies


_CONNECTING = threading.Lock()


class VectorIndex:
    """Thread-safe wrapper around one collection. Connects lazily and reconnects after failures.
    ``collection``: another collection than the settings' (the copy vectors')."""

    def __init__(self, settings: Settings, model: ModelInfo, collection: str | None = None) -> None:
        self.settings = settings if collection is None else settings.but(milvus={"collection": collection})
        self.model = model
        self._client: MilvusClient | None = None
        self._spec: IndexSpec | None = None
        self._runtimes: list[str] = []
        self._lock = threading.RLock()
        self._rebuilding = threading.Lock()
        self._duplicates = DuplicateScans(self.find_duplicates)
        self._listing = CollectionListing(self._listed_images)

    # --- connection -------------------------------------------------------------------------------
    def _connect(self) -> MilvusClient:
        if self._client is not None:
            return self._client
        uri = self.settings.milvus.uri
        if self.settings.milvus.is_lite:
            _quiet_lite_timestamp_noise()
            from pathlib import Path

            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            # One at a time in a process: the first client of a Lite file starts its local server, and two
            # started at once (the similarity and copy collections of one search) race for the file.
            with _CONNECTING:
                client = MilvusClient(uri=uri, token=self.settings.milvus.token.get_secret_value(), db_name=self.settings.milvus.db_name, timeout=self.settings.milvus.timeout_s)
        except (MilvusException, OSError, RuntimeError, *_LITE_ERRORS) as exc:
            if self.settings.milvus.is_lite:
                # A local file does not come back by waiting: report it at once, with the usual cause.
                raise MilvusLiteLocked(
                    f"Cannot open the Milvus Lite file {uri} ({exc}). Most often another process holds it: "
                    "Milvus Lite allows one process per file. Stop the other process (the service or an ingest "
                    "job), or run `milvus-lite server` (or a Milvus server) and point RIS_MILVUS_URI at it."
                ) from exc
            raise BackendUnavailable(f"Cannot open Milvus at {uri}: {exc}.") from exc
        self._client = client
        return client

    def _milvus(self) -> MilvusClient:
        """A connected client with the collection ready (created, guarded and loaded)."""
        with self._lock:
            client = self._connect()
            if self._spec is None:
                self._spec = self._prepare_collection(client)
            return client

    def _reset(self) -> None:
        client, self._client, self._spec = self._client, None, None
        if client is not None:
            try:
                client.close()
            except MilvusException:
                logger.debug("closing a broken Milvus client failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._reset()

    def _run(self, what: str, call: Callable[[MilvusClient, float], T], *, client: MilvusClient | None = None, timeout: float | None = None) -> T:
        """One MilvusClient call, always with a timeout. A lost or frozen server becomes
        BackendUnavailable (503) and a fresh connection on the next call, so the service recovers by
        itself when Milvus is back. ``call`` gets the client and the timeout to pass on."""
        milvus = client or self._milvus()
        try:
            return call(milvus, timeout or self.settings.milvus.timeout_s)
        except (MilvusUnavailableException, ConnectError) as exc:
            self._reset()
            raise BackendUnavailable(f"Milvus {what} failed: {exc}") from exc
        except grpc.RpcError as exc:
            # pymilvus lets some transport errors through unwrapped (a deadline while Milvus hangs).
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                raise
            self._reset()
            raise BackendUnavailable(
                f"Milvus at {self.settings.milvus.uri} did not answer {what} in time ({exc.code().name})"  # type: ignore[attr-defined]
            ) from exc
        except MilvusException as exc:
            if _is_connection_problem(exc):
                self._reset()
                raise BackendUnavailable(f"Milvus at {self.settings.milvus.uri} is unavailable ({what}): {exc.message}") from exc
            raise

    # --- collection lifecycle -------------------------------------------------------------------------
    def index_in_use(self) -> IndexSpec:
        """The collection's index (as recorded when it was built)."""
        self.ensure_ready()
        return self._spec or index_spec(self.settings.milvus.index_type)

    def model_properties(self) -> dict[str, str]:
        return {
            f"{_P}model_id": self.model.model_id,
            f"{_P}backbone": self.model.backbone,
            f"{_P}dim": str(self.model.dim),
            f"{_P}preprocessing": self.model.preprocessing,
            f"{_P}vectors_per_image": str(self.model.vectors_per_image),
            f"{_P}schema_version": SCHEMA_VERSION,
        }

    def _prepare_collection(self, client: MilvusClient) -> IndexSpec:
        name = self.settings.milvus.collection
        if not self._run("has_collection", lambda c, t: c.has_collection(name, timeout=t), client=client):
            spec = index_spec(self.settings.milvus.index_type, self.settings.milvus.index_params)
            self._create_collection(client, spec)
            return spec
        props = self._run("describe_collection", lambda c, t: c.describe_collection(name, timeout=t), client=client).get("properties", {}) or {}
        self._guard(props)
        self._record_runtime(client, props)
        spec = IndexSpec.model_validate_json(props[f"{_P}index"]) if f"{_P}index" in props else index_spec("FLAT")
        if not self._run("list_indexes", lambda c, t: c.list_indexes(name, timeout=t), client=client):
            self._create_index(client, spec)
        self._load(client)
        return spec

    def _guard(self, props: dict[str, str]) -> None:
        expected = self.model_properties()
        if f"{_P}model_id" not in props:
            raise ModelMismatch(
                f"Collection '{self.settings.milvus.collection}' was not created by this product (no model record); "
                "choose another RIS_MILVUS_COLLECTION."
            )
        differences = [
            f"{key.removeprefix(_P)}: collection has {props.get(key)!r}, serving model has {value!r}"
            for key, value in expected.items()
            if props.get(key) != value
        ]
        if differences:
            raise ModelMismatch(
                f"Collection '{self.settings.milvus.collection}' holds embeddings of another model or recipe; refusing to "
                f"mix them ({'; '.join(differences)}). Re-embed it from its stored originals with `python -m "
                "ingest.reembed` (resumable; the collection keeps its name), serve the model it was built with, or use "
                "another RIS_MILVUS_COLLECTION."
            )

    def _runtime_label(self) -> str:
        return f"{self.model.runtime or 'unknown'}-{self.model.precision or 'unknown'}"

    def _record_runtime(self, client: MilvusClient, props: dict[str, str]) -> None:
        """Keep the list of runtime/precision pairs that have embedded for this collection.

        They are allowed to mix (unlike models): every fast runtime is checked at start-up to stay within
        cosine 0.99 of the fp32 reference (models/runtime.py), so the record is for audit, not refusal."""
        self._runtimes = [r for r in props.get(f"{_P}runtimes", "").split(",") if r]
        label = self._runtime_label()
        if label in self._runtimes or not self.model.runtime:  # no runtime: a tool that embeds nothing (a backup)
            return
        self._runtimes.append(label)
        logger.info("Collection %s: embeddings now also come from %s", self.settings.milvus.collection, label)
        self._set_property(client, f"{_P}runtimes", ",".join(self._runtimes))

    def _create_collection(self, client: MilvusClient, spec: IndexSpec) -> None:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=80)
        schema.add_field("id", DataType.VARCHAR, max_length=64)
        schema.add_field("view", DataType.INT8)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.model.dim)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_LENGTH * 4)
        schema.add_field("mime", DataType.VARCHAR, max_length=32)
        schema.add_field("width", DataType.INT32)
        schema.add_field("height", DataType.INT32)
        schema.add_field("size_bytes", DataType.INT64)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE_BYTES)
        schema.add_field("created_at", DataType.INT64)
        schema.add_field("pixel_hash", DataType.VARCHAR, max_length=32)
        self._runtimes = [self._runtime_label()] if self.model.runtime else []
        properties = {**self.model_properties(), f"{_P}index": spec.model_dump_json(), f"{_P}runtimes": ",".join(self._runtimes)}
        # The index is created in a second call: passing it to create_collection makes pymilvus ask
        # Milvus Lite for a timestamp it does not implement, which logs a scary (harmless) traceback.
        name = self.settings.milvus.collection
        self._run("create_collection", lambda c, t: c.create_collection(name, schema=schema, properties=properties, timeout=t), client=client)
        self._create_index(client, spec)
        self._load(client)
        logger.info(
            "Created collection %s (%s, dim %d, %s %s)",
            self.settings.milvus.collection, self.model.model_id, self.model.dim, spec.index_type, spec.params,
        )

    @staticmethod
    def _index_params(client: MilvusClient, spec: IndexSpec) -> Any:
        params = client.prepare_index_params()
        params.add_index("vector", index_type=spec.index_type, metric_type=METRIC, params=dict(spec.params))
        return params

    def _create_index(self, client: MilvusClient, spec: IndexSpec) -> None:
        name, params = self.settings.milvus.collection, self._index_params(client, spec)
        self._run("create_index", lambda c, t: c.create_index(name, params, timeout=t), client=client, timeout=LOAD_TIMEOUT_S)

    def _load(self, client: MilvusClient) -> None:
        name = self.settings.milvus.collection
        self._run("load_collection", lambda c, t: c.load_collection(name, timeout=t), client=client, timeout=LOAD_TIMEOUT_S)
        # A (re)loaded collection answers a Strong query only once its query node has replayed its channel
        # from the last checkpoint: on a busy server, after an index rebuild, that took over 10 s here, and
        # the first count after the rebuild failed (503) although the rebuild had succeeded. Loaded means
        # "answers" here: wait for it within the load's budget.
        self._run(
            "count",
            lambda c, t: c.query(name, filter=MAIN_VIEW, output_fields=["count(*)"], consistency_level="Strong", timeout=t),
            client=client,
            timeout=LOAD_TIMEOUT_S,
        )

    def _set_property(self, client: MilvusClient, key: str, value: str) -> None:
        name = self.settings.milvus.collection
        self._run("alter_collection_properties", lambda c, t: c.alter_collection_properties(name, properties={key: value}, timeout=t), client=client)

    def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        """Replace the vector index: one rebuild at a time (Conflict otherwise), parameters checked before
        anything is dropped, and on failure the previous index is built and loaded again. The collection
        is unloaded meanwhile; searches wait on the lock."""
        spec = index_spec(spec.index_type, spec.params)
        if not self._rebuilding.acquire(blocking=False):
            raise Conflict("An index rebuild is already running; try again when it has finished.")
        try:
            with self._lock:
                started = time.monotonic()
                client = self._milvus()
                previous = self._spec or index_spec(self.settings.milvus.index_type, self.settings.milvus.index_params)
                try:
                    self._replace_index(client, spec)
                except (SearchError, MilvusException, grpc.RpcError) as exc:
                    logger.error("Rebuilding the index as %s failed (%s); restoring %s", spec.index_type, exc, previous.index_type)
                    self._restore_index(previous)
                    raise BackendUnavailable(
                        f"Building the {spec.index_type} index failed ({getattr(exc, 'message', exc)}); the previous "
                        f"{previous.index_type} index was restored and searches go on."
                    ) from exc
                self._set_property(client, f"{_P}index", spec.model_dump_json())
                self._spec = spec
            logger.info("Rebuilt index as %s %s in %.1f s", spec.index_type, spec.params, time.monotonic() - started)
            return self.info()
        finally:
            self._rebuilding.release()

    def _replace_index(self, client: MilvusClient, spec: IndexSpec) -> None:
        name = self.settings.milvus.collection
        self._run("release_collection", lambda c, t: c.release_collection(name, timeout=t), client=client)
        for index_name in self._run("list_indexes", lambda c, t: c.list_indexes(name, timeout=t), client=client):
            self._run("drop_index", lambda c, t, index_name=index_name: c.drop_index(name, index_name, timeout=t), client=client)
        self._create_index(client, spec)
        self._load(client)

    def _restore_index(self, previous: IndexSpec) -> None:
        """Build and load the previous index. If Milvus cannot do it now, the next call reconnects and
        rebuilds it from the collection's recorded index (the record changes only after a success)."""
        try:
            self._replace_index(self._client or self._connect(), previous)
        except (SearchError, MilvusException, grpc.RpcError):
            logger.exception("Restoring the previous index failed; the next call will rebuild it")
            self._reset()

    def ensure_ready(self) -> None:
        self._milvus()

    def ping(self) -> None:
        """A real round trip (readiness probes): raise BackendUnavailable when Milvus does not answer."""
        name = self.settings.milvus.collection
        state = self._run("get_load_state", lambda c, t: c.get_load_state(name, timeout=t))
        if "Loaded" not in str(state.get("state", "")):
            raise BackendUnavailable(f"Collection {self.settings.milvus.collection} is not loaded ({state}).")

    # --- data ---------------------------------------------------------------------------------------
    @staticmethod
    def _chunks(rows: list[dict[str, Any]], row_bytes: int) -> Iterator[list[dict[str, Any]]]:
        per_chunk = max(1, MAX_UPSERT_BYTES // max(row_bytes, 1))
        for start in range(0, len(rows), per_chunk):
            yield rows[start : start + per_chunk]

    def _keys(self, ids: list[str]) -> list[str]:
        """Every row key of these images: the main view's key is the image id, extra view k's is id:k."""
        return [*ids, *(f"{image_id}:{view}" for image_id in ids for view in range(1, self.model.vectors_per_image))]

    def upsert(self, records: list[VectorRecord]) -> int:
        """Write images (all their views); returns the number of images written. The extra views are written
        before the main views, whose rows mark images present: a crash in between leaves no image that is
        present without all its views (the next add rewrites them)."""
        rows, main_rows = [], []
        for record in records:
            vectors = [record.vector, *record.views]
            if len(vectors) != self.model.vectors_per_image or any(len(v) != self.model.dim for v in vectors):
                raise InvalidRequest(
                    f"an image needs {self.model.vectors_per_image} vectors of {self.model.dim} dims; got "
                    f"{[len(v) for v in vectors]}"
                )
            row = record.model_dump(exclude={"vector", "views"})
            row["source"] = _truncate_utf8(record.source, MAX_SOURCE_BYTES)
            main_rows.append({**row, "key": record.id, "view": 0, "vector": record.vector})
            rows.extend({**row, "key": f"{record.id}:{view}", "view": view, "vector": vector} for view, vector in enumerate(record.views, 1))
        rows.extend(main_rows)
        if not rows:
            return 0
        row_bytes = self.model.dim * 4 + 2 * MAX_SOURCE_BYTES
        for chunk in self._chunks(rows, row_bytes):
            self._run("upsert", lambda c, t, chunk=chunk: c.upsert(self.settings.milvus.collection, chunk, timeout=t))
        self._listing.upserted(ListedImage(record.id, record.label, record.created_at) for record in records)
        return len(records)

    def search(self, query: VectorQuery) -> list[VectorHit]:
        vectors = [query.vector, *query.extra_vectors]
        if any(len(vector) != self.model.dim for vector in vectors):
            raise InvalidRequest(f"a query vector has other than {self.model.dim} dims (the collection's)")
        if query.top_k + query.offset > MAX_WINDOW:
            raise InvalidRequest(f"top_k + offset must be at most {MAX_WINDOW}")
        spec = self._spec or index_spec(self.settings.milvus.index_type)
        # Each image has one row per searched view: fetching that many times the window and keeping each
        # image's best row gives exactly the images of the window, each once with its best score.
        views = sorted({0, *(v for v in query.views if 0 < v < self.model.vectors_per_image)}) if query.views is not None else None
        if views is not None and len(views) == self.model.vectors_per_image:
            views = None
        window = min(MAX_WINDOW, (query.top_k + query.offset) * (len(views) if views else self.model.vectors_per_image))
        kwargs: dict[str, Any] = {
            "limit": window,
            "output_fields": [*HIT_FIELDS, "view"],
            "search_params": {"metric_type": METRIC, "params": _search_params(spec, window)},
            # Not Strong: on a Milvus server a Strong search waits for the next time tick (~200 ms, measured
            # in bench/index_bench.py). Session still shows every write made through this client.
            "consistency_level": self.settings.milvus.search_consistency,
        }
        filters = [_label_filter(query.label)] if query.label is not None else []
        if views is not None:
            filters.append(MAIN_VIEW if views == [0] else f"view in {views}")
        if filters:
            kwargs["filter"] = " and ".join(filters)
        # Every query vector (a small query is also embedded at its low-res views' side) in one request.
        # An image of the final window has its best row in the window of the vector that scored it best,
        # so merging the windows by image finds every such image with its best score.
        results = self._run("search", lambda c, t: c.search(self.settings.milvus.collection, vectors, timeout=t, **kwargs))
        # An extra view's match may count for less than a main-view match (its margin): each image keeps its
        # best score after the margins, and the images are ranked by it. (With margins, an image whose only
        # rows in the window are extra views may rank a margin's width too low at the window's tail.)
        best: dict[str, VectorHit] = {}
        for hit in (hit for rows in results for hit in rows):
            entity = dict(hit["entity"])
            score = float(hit["distance"]) - query.margins.get(int(entity.pop("view")), 0.0)
            if entity["id"] not in best or score > best[entity["id"]].score:
                best[entity["id"]] = VectorHit(score=score, image=ImageMetadata(**entity))
        ranked = sorted(best.values(), key=lambda hit: hit.score, reverse=True)
        hits = ranked[query.offset : query.offset + query.top_k]
        return [hit for hit in hits if query.min_score is None or hit.score >= query.min_score]

    def get(self, ids: list[str]) -> list[ImageMetadata]:
        if not ids:
            return []
        rows = self._get(ids, HIT_FIELDS)
        return [ImageMetadata(**{k: row[k] for k in HIT_FIELDS}) for row in rows]

    def get_vector(self, image_id: str) -> list[float] | None:
        rows = self._get([image_id], ["vector"])
        return [float(v) for v in rows[0]["vector"]] if rows else None

    def existing_ids(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        return {row["id"] for row in self._get(ids, ["id"])}

    def _get(self, ids: list[str], fields: list[str]) -> list[dict[str, Any]]:
        """Main-view rows by image id (their keys), read-your-writes (Strong): used to decide what is present."""
        name = self.settings.milvus.collection
        return self._run("get", lambda c, t: c.get(name, ids=ids, output_fields=fields, consistency_level="Strong", timeout=t))

    def delete(self, ids: list[str]) -> int:
        if not ids:
            return 0
        present = self.existing_ids(ids)
        if present:
            keys = self._keys(sorted(present))
            self._run("delete", lambda c, t: c.delete(self.settings.milvus.collection, ids=keys, timeout=t))
            self._listing.deleted(present)
        return len(present)

    def _scan(
        self, fields: list[str], *, batch_size: int, row_filter: str = MAIN_VIEW, name: str | None = None,
        client: MilvusClient | None = None, **options: Any,
    ) -> Iterator[list[dict[str, Any]]]:
        """A whole collection (this one unless ``name``) in batches of rows: the one query-iterator loop,
        every call bounded and retried like any other, the iterator closed whatever happens."""
        name = name or self.settings.milvus.collection
        iterator = self._run(
            "query_iterator",
            lambda c, t: c.query_iterator(name, batch_size=batch_size, filter=row_filter, output_fields=fields, timeout=t, **options),
            client=client,
        )
        try:
            while batch := self._run("query_iterator.next", lambda c, t: iterator.next(), client=client):
                yield batch
        finally:
            iterator.close()

    def main_vectors(self, batch_size: int = 1000) -> Iterator[ImageVector]:
        """Every image's main-view vector and pixel digest (the duplicate finder, the re-embed job)."""
        for batch in self._scan(["id", "pixel_hash", "vector"], batch_size=batch_size):
            for row in batch:
                yield ImageVector(row["id"], row["pixel_hash"], np.asarray(row["vector"], dtype=np.float32))

    def records(self, batch_size: int = 500) -> Iterator[tuple[ImageMetadata, str, np.ndarray]]:
        """Every image whole, for a backup: its metadata, pixel digest and all its vectors (views x dim,
        float32), in batches of main-view rows whose extra views are read by key. An image deleted between
        the two reads (its views gone) is left out: a backup holds whole images only."""
        name = self.settings.milvus.collection
        views = self.model.vectors_per_image
        for batch in self._scan([*HIT_FIELDS, "pixel_hash", "vector"], batch_size=batch_size):
            extra: dict[str, list[float]] = {}
            if views > 1:
                keys = [f"{row['id']}:{view}" for row in batch for view in range(1, views)]
                rows = self._run("get", lambda c, t, keys=keys: c.get(name, ids=keys, output_fields=["key", "vector"], timeout=t))
                extra = {row["key"]: row["vector"] for row in rows}
            for row in batch:
                keys = [f"{row['id']}:{view}" for view in range(1, views)]
                if any(key not in extra for key in keys):
                    continue
                vectors = np.asarray([row["vector"], *(extra[key] for key in keys)], dtype=np.float32)
                yield ImageMetadata(**{k: row[k] for k in HIT_FIELDS}), row["pixel_hash"], vectors

    def find_duplicates(self, near_threshold: float) -> DuplicateReport:
        return find_duplicates(self.main_vectors(), near_threshold)

    def duplicates(self, query: DuplicateQuery) -> DuplicatePage:
        """A page of the duplicate report, computed in the background (state "running" meanwhile)."""
        return self._duplicates.page(query)

    # --- the gallery and the labels (a listing kept in memory: Milvus cannot sort or group a query) ----------
    def _listed_images(self) -> Iterator[ListedImage]:
        # Strong: every write made before the scan starts is in it (those made during it are replayed).
        for batch in self._scan(["id", "label", "created_at"], batch_size=4096, consistency_level="Strong"):
            yield from (ListedImage(row["id"], row["label"], int(row["created_at"])) for row in batch)

    def browse(self, query: BrowseQuery) -> BrowsePage:
        """A page of the collection, newest first (state "scanning" until the first listing is read)."""
        page, ids = self._listing.page(query)
        found = {meta.id: meta for meta in self.get(ids)}
        # An image deleted by another process since the listing was read is left out of its page.
        return page.model_copy(update={"images": [found[image_id] for image_id in ids if image_id in found]})

    def labels(self) -> LabelList:
        """Every label in use with its number of images, most used first."""
        return self._listing.labels()

    def start_listing(self) -> None:
        """Read the listing in the background now (a service that pages the collection; a job never does)."""
        self._listing.start()

    # --- re-embedding (python -m ingest.reembed): other collections of the same Milvus, by name -----------
    def properties_of(self, name: str) -> dict[str, str] | None:
        """A collection's recorded properties, or None when it does not exist."""
        client = self._connect()
        if not self._run("has_collection", lambda c, t: c.has_collection(name, timeout=t), client=client):
            return None
        described = self._run("describe_collection", lambda c, t: c.describe_collection(name, timeout=t), client=client)
        return dict(described.get("properties", {}) or {})

    def images_of(self, name: str, batch_size: int = 500) -> Iterator[ImageMetadata]:
        """Every image of another collection made by this product, whatever its schema version (one row per
        image in version 1, main-view rows since 2)."""
        client = self._connect()
        props = self.properties_of(name) or {}
        self._load_named(client, name)
        main_rows = MAIN_VIEW if props.get(f"{_P}schema_version", "1") != "1" else ""
        for batch in self._scan(HIT_FIELDS, batch_size=batch_size, row_filter=main_rows, name=name, client=client):
            yield from (ImageMetadata(**{k: row[k] for k in HIT_FIELDS}) for row in batch)

    def _load_named(self, client: MilvusClient, name: str) -> None:
        self._run("load_collection", lambda c, t: c.load_collection(name, timeout=t), client=client, timeout=LOAD_TIMEOUT_S)

    def take_name_of(self, old: str) -> None:
        """Drop collection ``old`` and give this collection its name (the last step of a re-embed). Safe to
        repeat after a crash in between: a missing ``old`` is not dropped twice."""
        with self._lock:
            client = self._connect()
            new = self.settings.milvus.collection
            if self._run("has_collection", lambda c, t: c.has_collection(old, timeout=t), client=client):
                self._run("drop_collection", lambda c, t: c.drop_collection(old, timeout=t), client=client)
            self._run("rename_collection", lambda c, t: c.rename_collection(new, old, timeout=t), client=client)
            self._reset()
            self._listing.invalidate()

    def count(self) -> int:
        name = self.settings.milvus.collection
        rows = self._run("count", lambda c, t: c.query(name, filter=MAIN_VIEW, output_fields=["count(*)"], consistency_level="Strong", timeout=t))
        return int(rows[0]["count(*)"])

    def info(self) -> IndexInfo:
        image_count = self.count()
        return IndexInfo(
            collection=self.settings.milvus.collection,
            image_count=image_count,
            model=self.model,
            index=self._spec or index_spec(self.settings.milvus.index_type),
            metric=METRIC,
            milvus_backend=self.settings.milvus.backend,
            milvus_uri=self.settings.milvus.uri,  # the token is a separate setting, never shown
            loaded=self._spec is not None,
            embedding_runtimes=list(self._runtimes),
        )

    def flush(self) -> None:
        """Seal what was written so the server builds its index over it (a no-op cost on Lite)."""
        name = self.settings.milvus.collection
        self._run("flush", lambda c, t: c.flush(name, timeout=t), timeout=LOAD_TIMEOUT_S)
