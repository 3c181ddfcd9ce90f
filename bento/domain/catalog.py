"""The catalog: every flow on the collection of images, written once, for the HTTP service and the ingest job.

It owns the rules (image ids are content hashes, what a label may be, what "present" means, how search
options are bounded) and the write order, and reaches its three dependencies through small ports:

- ``Embedding``: pixels -> unit vectors, by two models: the similarity model ("what looks like this?") and
  the copy model ("where is this picture, or an edited copy of it?"; none where RIS_MODEL_COPY_NAME=none).
  In-process models, the Embedder service, or a running service's HTTP API for ``ingest --service-url``;
- ``VectorStore``: a Milvus collection (``bento.adapters.vectors.VectorIndex`` in-process, or the VectorSearch
  service through its RPC adapter): one for the similarity vectors (with every image's metadata, the
  listing and the gallery), one for the copy vectors (``copies``), joined by the image id;
- ``ImageStore``: originals and thumbnails (``bento.adapters.storage``).

**Write order.** An image's blobs (original, thumbnail) are stored first, then its copy rows, then its
similarity rows (extra views first, the main row last): only the similarity main row marks an image as
added, so a crash in between leaves blobs and rows that the next add reuses, never a hit without an image.
An image is *complete* when its similarity row, its copy row and its original exist; an add of an image
whose similarity row exists repairs its blobs and a missing copy row (embedding only that). Removal runs
the other way (copy rows, similarity rows, blobs). Ids are content hashes and rows are upserts, so nothing
is ever duplicated.

Every dependency call runs under one retry policy (bento/core/retry.py), chosen by the caller: the HTTP API
fails fast (503), the ingest job rides out outages for as long as it is told.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pydantic import BaseModel

from bento.core.config import Settings
from bento.core.errors import (
    BackendUnavailable,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    ModelMismatch,
    NotFound,
    SearchError,
)
from bento.core.ids import validate_image_id
from bento.core.retry import FAIL_FAST, RetryPolicy
from bento.domain.duplicates import DuplicatePage, DuplicateQuery
from bento.domain.listing import BrowsePage, BrowseQuery, LabelList
from bento.domain.ports import MAX_WINDOW, AtOnce, Embedding, ImageStore, Kind, VectorStore
from bento.domain.schemas import (
    MAX_LABEL_LENGTH,
    ImageMetadata,
    IndexInfo,
    IndexSpec,
    Match,
    ModelDescription,
    ModelInfo,
    SearchMode,
    SearchOptions,
    Thresholds,
    Timings,
    VectorHit,
    VectorQuery,
    VectorRecord,
    next_page,
)
from models.backbones import Role
from models.imaging import DecodeLimits, decode_image, without_location
from models.pipeline import PreparedImage, max_batch, prepare_image

logger = logging.getLogger(__name__)
_A = TypeVar("_A")
_B = TypeVar("_B")


def clean_label(label: str | None) -> str:
    """The one label rule: at most MAX_LABEL_LENGTH printable characters, surrounding blanks dropped."""
    label = (label or "").strip()
    if len(label) > MAX_LABEL_LENGTH or any(ord(ch) < 32 or ord(ch) == 127 for ch in label):
        raise InvalidRequest(f"A label is at most {MAX_LABEL_LENGTH} printable characters; got {label[:40]!r}...")
    return label


@dataclass
class NewImage:
    """An image on its way in: decoded and preprocessed, with what is recorded beside it."""

    prepared: PreparedImage
    label: str
    source: str
    created_at: int | None = None  # kept from an earlier row (a re-embed); None: now


class Added(BaseModel):
    """What adding one image did: ``created`` False when its row already existed (blobs are repaired)."""

    id: str
    created: bool
    image: ImageMetadata


class SearchResult(BaseModel):
    query_id: str | None
    mode: SearchMode = "both"
    hits: list[VectorHit]
    top_k: int
    offset: int
    label: str | None
    min_score: float | None = None
    model: str
    copy_model: str | None = None
    timings: Timings
    has_more: bool = False
    next_offset: int | None = None


@dataclass
class SimilarQuery:
    """The similarity side of a search: the query's vector, the query embedded at other input sides (searched
    as well, best per image), and the query image's size, which decides the stored views it is compared with
    (None: a stored image's vector, compared with the views every query meets)."""

    vector: list[float]
    extra_vectors: list[list[float]] = field(default_factory=list)
    size: tuple[int, int] | None = None


@dataclass
class CopyQuery:
    """The copy side of a search: the query's copy vector and the query image's size (None: a stored image's
    vector, never re-checked)."""

    vector: list[float]
    size: tuple[int, int] | None = None


# How many of a small query's best copy candidates are re-checked at its size (bench/two_models.py: with two
# quarters of each photo stored beside it, 64-px thumbnails find their original first 1.00 with 5 or 10; ~20 ms).
RECHECK_CANDIDATES = 5


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


class Catalog:
    def __init__(
        self,
        vectors: VectorStore,
        store: ImageStore,
        embedding: Embedding,
        settings: Settings,
        *,
        copies: VectorStore | None = None,
        retry: RetryPolicy = FAIL_FAST,
        at_once: AtOnce | None = None,
    ) -> None:
        """Built from settings by ``bento.adapters.assembly.open_catalog`` (the one way every entry point
        builds it). ``copies``: the copy vectors' store, required when the embedding has a copy model.
        ``at_once``: how two independent calls run at the same time (default: a thread pool of the
        catalog's own; the service passes one whose threads may call its dependencies)."""
        limits = settings.limits
        self.vectors = vectors
        self.copies = copies
        self.store = store
        self.embedding = embedding
        self.limits = limits
        self.decode_limits = DecodeLimits(limits.max_upload_bytes, limits.max_image_pixels, limits.max_decoded_bytes)
        self.thumbnail_size = settings.store.thumbnail_size
        # Candidates are brought down to a small query's size from their thumbnails, never up.
        self.recheck_side = min(settings.model.copy_recheck_side, self.thumbnail_size)
        self.retry = retry
        self.serve_location = settings.store.serve_location
        self.verdict_settings = settings.verdict
        # The two collections' searches of a search run at once (I/O: a search waits for the slower one, not
        # for both in turn). The pool is started on first use.
        self._at_once = at_once or self._in_pool
        self._pool: ThreadPoolExecutor | None = None

    def _in_pool(self, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="catalog-copies")
        later = self._pool.submit(second)
        try:
            return first(), later.result()
        finally:
            later.cancel()

    def _both(self, first: Callable[[], _A] | None, second: Callable[[], _B] | None) -> tuple[_A | None, _B | None]:
        """Two independent calls, at the same time where both are asked for (None: not asked)."""
        if first is None or second is None:
            return (first() if first else None, second() if second else None)
        return self._at_once(first, second)

    def close(self) -> None:
        """Release what the catalog opened (the Milvus connections of in-process vector indexes)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.vectors.close()
        if self.copies is not None:
            self.copies.close()

    # --- the models ---------------------------------------------------------------------------------
    def model(self) -> ModelInfo:
        return self.retry.call(self.embedding.describe).info

    def copy_model(self) -> ModelDescription | None:
        """The copy model, when one serves (and the catalog has a store for its collection)."""
        if self.copies is None:
            return None
        return self.retry.call(self.embedding.describe_copy)

    def _copies(self) -> VectorStore | None:
        """The copy vectors' store, when a copy model serves."""
        return self.copies if self.copy_model() is not None else None

    def ensure_ready(self) -> None:
        """Open (or create) every collection an add writes to, the copy model's too: a collection that holds
        another model is refused before any work is done for it, and a new one is created up front."""
        self.retry.call(self.vectors.ensure_ready)
        copies = self._copies()
        if copies is not None:
            self.retry.call(copies.ensure_ready)

    def prepare(self, data: bytes, *, to_store: bool) -> PreparedImage:
        """Check, decode and preprocess untrusted bytes (InvalidImage / ImageTooLarge / ... on bad input).
        ``to_store``: with the thumbnail and every view of the recipes (an image to add), else the query views.
        Pixels for the copy model too where one serves (one decode for both)."""
        preprocessing = self.retry.call(self.embedding.describe).preprocessing
        copy = self.copy_model()
        return prepare_image(
            data, self.decode_limits, preprocessing, self.thumbnail_size if to_store else None, all_views=to_store,
            copy=copy.preprocessing if copy else None,
        )

    def _embed(self, pixels: np.ndarray, role: Role = "similarity") -> np.ndarray:
        """In calls of at most max_batch images (a batch of images times their views may be more)."""
        step = max_batch(pixels.shape[1])
        if len(pixels) <= step:
            return self.retry.call(self.embedding.embed, pixels, role)
        return np.concatenate([self.retry.call(self.embedding.embed, pixels[i : i + step], role) for i in range(0, len(pixels), step)])

    def thresholds(self) -> Thresholds:
        """The verdict thresholds: the settings' where given, else those measured for the models (same image and
        near duplicate: the copy model's where one serves)."""
        copy = self.copy_model()
        return Thresholds.resolve(self.verdict_settings, self.model(), copy.info if copy else None)

    def embed_pixels(
        self, pixels: np.ndarray, role: Role = "similarity", recipe_version: str | None = None
    ) -> tuple[np.ndarray, ModelInfo]:
        """Embed pixels prepared elsewhere (``ingest --service-url``). ``recipe_version``, where the client says
        it (the ingest client does), must be the serving recipe's: pixels prepared by another version of the
        recipe (an older client that embeds a view at another side) would pass by their shape alone and be
        stored as wrong vectors. Their shape is checked once per boundary, not here: by the HTTP route as it
        reads the .npy body, and by the model (in the embedder's process)."""
        description = self.retry.call(self.embedding.describe) if role == "similarity" else self.copy_model()
        if description is None:
            raise InvalidRequest("No copy model serves here (RIS_MODEL_COPY_NAME=none).")
        served = description.preprocessing.version
        if recipe_version is not None and recipe_version != served:
            raise ModelMismatch(f"These pixels were prepared with recipe {recipe_version[:200]!r}; this service embeds {served!r}.")
        return self._embed(pixels, role), description.info

    # --- adding ------------------------------------------------------------------------------------
    def complete_ids(self, ids: list[str]) -> set[str]:
        """Ids whose vector rows (similarity and copy) AND original exist: nothing left to do for them."""
        if not ids:
            return set()
        rows = self.retry.call(self.vectors.existing_ids, ids)
        copies = self._copies()
        if copies is not None and rows:
            rows &= self.retry.call(copies.existing_ids, sorted(rows))
        return {image_id for image_id in rows if self.retry.call(self.store.exists, image_id, "original")}

    def add(self, data: bytes, label: str | None, source: str) -> Added:
        """Add one image from its bytes (the HTTP API)."""
        image = NewImage(self.prepare(data, to_store=True), clean_label(label), source)
        return self.add_many([image])[0]

    def add_many(self, images: Sequence[NewImage], *, write_blobs: bool = True) -> list[Added]:
        """Add prepared images (distinct ids) in the write order; one embedding call per model and input side
        for the new ones. ``write_blobs=False`` where the store already holds them (a re-embed from the stored
        originals)."""
        if not images:
            return []
        ids = [image.prepared.id for image in images]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("add_many takes distinct images; drop duplicate files first.")
        existing = {meta.id: meta for meta in self.retry.call(self.vectors.get, ids)}
        fresh = [image for image in images if image.prepared.id not in existing]
        now = int(time.time())
        records: dict[str, VectorRecord] = {}
        if fresh:
            vectors = self._embed_views([self._views_of(image.prepared) for image in fresh])
            for image, own in zip(fresh, vectors, strict=True):
                records[image.prepared.id] = _record(image.prepared, own, image.label, image.source, image.created_at or now)
        copies = self._copies()
        copy_records = self._copy_records(copies, images, existing, records) if copies is not None else []
        # Blobs first (a repair for the existing rows), then the copy rows, then the rows that mark the new
        # images added.
        for image in images if write_blobs else ():
            self.retry.call(_store_blobs, image.prepared, self.store)
        if copies is not None and copy_records:
            self.retry.call(copies.upsert, copy_records)
        if records:
            self.retry.call(self.vectors.upsert, list(records.values()))
        return [
            Added(id=image_id, created=False, image=existing[image_id])
            if image_id in existing
            else Added(id=image_id, created=True, image=ImageMetadata(**records[image_id].model_dump(exclude={"vector", "views"})))
            for image_id in ids
        ]

    def _copy_records(
        self, copies: VectorStore, images: Sequence[NewImage], existing: dict[str, ImageMetadata], records: dict[str, VectorRecord]
    ) -> list[VectorRecord]:
        """The copy rows to write: every new image's, and those an existing image lacks (a repair: an image
        added before its copy model, or a crash between its two writes). Embedded by the copy model only."""
        present = self.retry.call(copies.existing_ids, sorted(existing)) if existing else set()
        missing = [image for image in images if image.prepared.id not in present]
        if not missing:
            return []
        vectors = self._embed_views([self._copy_views_of(image.prepared) for image in missing], "copy")
        now = int(time.time())
        copy_records = []
        for image, own in zip(missing, vectors, strict=True):
            meta = existing.get(image.prepared.id)
            if meta is None:  # a new image: the same metadata as its similarity rows
                record = records[image.prepared.id]
                meta = ImageMetadata(**record.model_dump(exclude={"vector", "views"}))
            copy_records.append(
                _record(image.prepared, own, meta.label, meta.source, meta.created_at or now)
            )
        return copy_records

    def _views_of(self, prepared: PreparedImage) -> tuple[np.ndarray, ...]:
        if prepared.views is None:
            raise InvalidRequest("An image to add must be prepared with to_store=True (all its views).")
        return prepared.views

    def _copy_views_of(self, prepared: PreparedImage) -> tuple[np.ndarray, ...]:
        if prepared.copy_views is None:
            raise InvalidRequest("An image to add must be prepared with the copy model's recipe too (all its views).")
        return prepared.copy_views

    def _embed_views(self, views: list[tuple[np.ndarray, ...]], role: Role = "similarity") -> list[np.ndarray]:
        """Every view of every image -> each image's (views, dim) vectors. One embedding call per input
        side (the main crop, a view's smaller one): an embedder batch holds one shape."""
        by_side: dict[int, list[tuple[int, int]]] = {}
        for image, image_views in enumerate(views):
            for view, pixels in enumerate(image_views):
                by_side.setdefault(pixels.shape[0], []).append((image, view))
        copy = self.copy_model() if role == "copy" else None
        dim = copy.info.dim if copy is not None else self.model().dim
        vectors = [np.empty((len(image_views), dim), dtype=np.float32) for image_views in views]
        for places in by_side.values():
            embedded = self._embed(np.stack([views[image][view] for image, view in places]), role)
            for (image, view), vector in zip(places, embedded, strict=True):
                vectors[image][view] = vector
        return vectors

    # --- reading and removing -----------------------------------------------------------------------
    def metadata(self, image_id: str) -> ImageMetadata:
        validate_image_id(image_id)
        found = self.retry.call(self.vectors.get, [image_id])
        if not found:
            raise NotFound(f"No image with id {image_id}.")
        return found[0]

    def blob(self, image_id: str, kind: Kind) -> tuple[bytes, str]:
        """The bytes of an image's original or thumbnail and their media type (only for a present image).
        Originals come without their EXIF GPS location unless the settings keep it (thumbnails have no
        metadata at all)."""
        meta = self.metadata(image_id)
        data = self.retry.call(self.store.get, image_id, kind)
        if kind == "thumbnail":
            return data, "image/jpeg"
        return (data if self.serve_location else without_location(data)), meta.mime

    def direct_url(self, image_id: str, kind: Kind) -> str | None:
        """A URL straight to the store (presigned), or None when the bytes must be served by the caller:
        always for originals unless locations may be served (the store holds them as uploaded, GPS and all;
        ``blob`` removes it)."""
        if kind == "original" and not self.serve_location:
            return None
        return self.store.presigned_url(image_id, kind)

    def remove(self, image_id: str) -> None:
        """Remove an image in the reverse of the write order: its copy rows, its similarity rows (no hit may
        point at a missing image), then its blobs."""
        validate_image_id(image_id)
        copies = self._copies()
        if copies is not None:
            self.retry.call(copies.delete, [image_id])
        removed = self.retry.call(self.vectors.delete, [image_id])
        had_blob = self.retry.call(self.store.exists, image_id, "original")
        self.retry.call(self.store.delete, image_id)
        if not removed and not had_blob:
            raise NotFound(f"No image with id {image_id}.")

    # --- searching ---------------------------------------------------------------------------------
    def _checked(self, options: SearchOptions) -> tuple[int, str | None, int]:
        """(top_k, label, the deepest a search may page) of a search, checked before any work is done for it."""
        top_k = options.top_k or self.limits.default_top_k
        if top_k > self.limits.max_top_k:
            raise InvalidRequest(f"top_k is at most {self.limits.max_top_k}.")
        deepest = self._deepest()
        if top_k + options.offset > deepest:
            raise InvalidRequest(f"top_k + offset is at most {deepest}.")
        return top_k, clean_label(options.label) if options.label else None, deepest

    def _deepest(self) -> int:
        """How deep a search may page: Milvus returns at most MAX_WINDOW rows, and an image may take one row
        per stored view."""
        copy = self.copy_model()
        most_views = max(self.model().vectors_per_image, copy.info.vectors_per_image if copy else 1)
        return MAX_WINDOW // most_views

    def _search(
        self,
        options: SearchOptions,
        query_id: str | None,
        timings: Timings,
        make_similar: Callable[[], SimilarQuery] | None,
        copy_query: CopyQuery | None,
    ) -> SearchResult:
        """One page of the answer to both questions: the copies (copy-model hits at or above the near-duplicate
        threshold, best first), then the similar images (similarity-model hits, best first), each image once.
        ``make_similar`` makes the similarity query (None: no similar list); it runs while the copy collection
        is searched, so a query's similarity embedding overlaps that search. ``copy_query``: the copy query (None:
        no copies list); a small one's best candidates are re-checked at its size (``_recheck``).

        Paging is exact: a page of the joined list needs at most offset + top_k copies, and at most that many
        similar hits once the copies (at most as many) are left out of them."""
        started, embedded_before = time.perf_counter(), timings.embed_ms
        top_k, label, deepest = self._checked(options)
        window = options.offset + top_k
        # One hit more than the page from each list says exactly whether the joined list goes on (a list
        # cut at window + 1 either has more by itself, or is whole); never past Milvus' deepest window.
        fetch = min(window + 1, deepest)
        thresholds = self.thresholds()
        copy_store = self._copies()
        copy_search: Callable[[], list[VectorHit]] | None = None
        similar_search: Callable[[], list[VectorHit]] | None = None
        if copy_query is not None and copy_store is not None:
            recheck = self._recheck_size(copy_query)
            # A re-checked query is fetched at least RECHECK_CANDIDATES deep, so its re-checked candidates do not
            # depend on the page size; and without min_score, which applies to the score it is answered with
            # (a thumbnail's original is stored at ~0.6 and re-checked at ~0.9).
            copy_fetch = min(max(fetch, RECHECK_CANDIDATES), deepest) if recheck else fetch
            copy_vector_query = VectorQuery(
                vector=copy_query.vector, top_k=copy_fetch, label=label, min_score=None if recheck else options.min_score
            )

            def search_copies() -> list[VectorHit]:
                hits = self.retry.call(copy_store.search, copy_vector_query)
                if not recheck:
                    return hits
                floor = options.min_score
                return [hit for hit in self._recheck(hits, copy_query.vector, recheck) if floor is None or hit.score >= floor]

            copy_search = search_copies
        if make_similar is not None:
            recipe = self.retry.call(self.embedding.describe).preprocessing

            def search_similar() -> list[VectorHit]:
                query = make_similar()
                return self.retry.call(self.vectors.search, VectorQuery(
                    vector=query.vector, top_k=fetch, label=label, min_score=options.min_score,
                    views=recipe.views_for_query(*(query.size or (1 << 30, 1 << 30))),
                    margins=recipe.view_margins(), extra_vectors=query.extra_vectors,
                ))

            similar_search = search_similar
        # Both collections at once; the similar list may hold an image the copies list has: it is left out.
        similar_hits, copy_hits = self._both(similar_search, copy_search)
        copies: list[VectorHit] = []
        for hit in copy_hits or []:
            verdict = thresholds.copy_verdict(hit.score)
            if verdict is not None:
                copies.append(hit.model_copy(update={"verdict": verdict, "match": "copy"}))
        similar: list[VectorHit] = []
        found = {hit.image.id for hit in copies}
        match: Match = "similar"
        for hit in similar_hits or []:
            if hit.image.id in found:
                continue
            verdict = thresholds.similar_verdict(hit.score) if copy_store is not None else thresholds.verdict(hit.score)
            similar.append(hit.model_copy(update={"verdict": verdict, "match": match}))
        joined = [*copies, *similar]
        hits = joined[options.offset : window]
        more = len(joined) > window and fetch > window
        # The similarity embedding made within counts as embedding, not searching.
        timings.search_ms = round(_ms(started) - (timings.embed_ms - embedded_before), 2)
        timings.total_ms = round(timings.decode_ms + timings.embed_ms + timings.search_ms, 2)
        copy = self.copy_model()
        return SearchResult(
            query_id=query_id, mode=options.mode, hits=hits, top_k=top_k, offset=options.offset, label=label,
            min_score=options.min_score, model=self.model().model_id, copy_model=copy.info.model_id if copy else None,
            timings=timings, **next_page(options.offset, len(hits), more),
        )

    def _recheck_size(self, query: CopyQuery) -> tuple[int, int] | None:
        """The size a copy query's candidates are re-checked at: its own, where it is small enough (else None)."""
        return query.size if query.size is not None and 0 < max(query.size) <= self.recheck_side else None

    def _recheck(self, hits: list[VectorHit], vector: list[float], size: tuple[int, int]) -> list[VectorHit]:
        """A small query's best copy candidates, also compared with it at its own size.

        The copy model sees a 64-px thumbnail blown up to its input, and its original sharp: the true score falls
        to 0.56-0.72 (p5-p50, under the near-duplicate threshold), so the thumbnail was no copy. Brought to the
        query's size from its stored thumbnail, a candidate meets the query as the query met it: its original
        scores ~0.9, another photo or a stored crop of the same photo no more than before (docs/models.md). A hit
        keeps the better of its two scores, so a re-checked hit never falls below one that was not, and paging
        stays exact. The re-check is an improvement, never a condition: a candidate without a readable thumbnail
        keeps its stored score, and a store or embedder that cannot answer now (a decode slot, an outage, a
        batcher shedding load) leaves every stored score as it is. Its time counts as searching (``search_ms``);
        its one embedding call may run beside the similarity model's (the copies half runs while that embeds)."""
        copy = self.copy_model()
        if not hits or copy is None:
            return hits
        candidates, pixels = [], []
        try:
            for hit in hits[:RECHECK_CANDIDATES]:
                try:
                    thumbnail = self.retry.call(self.store.get, hit.image.id, "thumbnail")
                    image = decode_image(thumbnail, self.decode_limits).image
                except (NotFound, InvalidImage, ImageTooLarge) as exc:
                    logger.warning("copy candidate %s not re-checked at the query's size: %s", hit.image.id, exc.message)
                    continue
                candidates.append(hit.image.id)
                pixels.append(copy.preprocessing.to_pixels(image.resize(size, Image.Resampling.LANCZOS)))
            if not pixels:
                return hits
            scores = self._embed(np.stack(pixels), "copy") @ np.asarray(vector, dtype=np.float32)
        except BackendUnavailable as exc:
            logger.warning("small query's copy candidates not re-checked (their stored scores stand): %s", exc.message)
            return hits
        at_size = {image_id: round(float(score), 6) for image_id, score in zip(candidates, scores, strict=True)}
        rescored = [
            hit.model_copy(update={"score": at_size[hit.image.id]}) if at_size.get(hit.image.id, -2.0) > hit.score else hit
            for hit in hits
        ]
        return sorted(rescored, key=lambda hit: -hit.score)

    def _modes(self, options: SearchOptions) -> tuple[bool, bool]:
        """(search copies, search similar) for the search's mode; copies only where a copy model serves."""
        serves = self._copies() is not None
        if options.mode == "copies" and not serves:
            raise InvalidRequest("mode=copies needs a copy model, and none serves here (RIS_MODEL_COPY_NAME=none).")
        return options.mode != "similar" and serves, options.mode != "copies"

    def search_image(self, data: bytes, options: SearchOptions) -> SearchResult:
        """Search with the bytes of an image (an upload, a fetched URL)."""
        self._checked(options)
        want_copies, want_similar = self._modes(options)
        started = time.perf_counter()
        timings = Timings()
        prepared = self.prepare(data, to_store=False)
        timings.decode_ms = _ms(started)
        # One model after the other: embedding is compute, and two at once on the same cores only contend
        # (measured: end-to-end p50 1.72x the recipe before with them at once, 1.27x in turn, 2 cores). The
        # copy model goes first, so its collection's search (I/O) runs while the similarity model embeds. (A
        # small query's re-check, in the copies half, is the exception: its batch of five may meet the
        # similarity model's embedding.)
        copy_query = None
        if want_copies and prepared.copy_pixels is not None:
            copy_query = CopyQuery(self._embed(prepared.copy_pixels[None], "copy")[0].tolist(), (prepared.width, prepared.height))
        timings.embed_ms = round(_ms(started) - timings.decode_ms, 2)

        def similar_query() -> SimilarQuery:
            embed_started = time.perf_counter()
            query = SimilarQuery(
                vector=self._embed(prepared.pixels[None])[0].tolist(),
                # A small query, also at its low-res views' input side (one call per side: a batch is one shape).
                extra_vectors=[self._embed(pixels[None])[0].tolist() for pixels in prepared.side_pixels.values()],
                size=(prepared.width, prepared.height),
            )
            timings.embed_ms = round(timings.embed_ms + _ms(embed_started), 2)
            return query

        return self._search(options, prepared.id, timings, similar_query if want_similar else None, copy_query)

    def search_stored(self, image_id: str, options: SearchOptions) -> SearchResult:
        """Search with an image of the collection (its stored vectors: no decoding, no embedding)."""
        validate_image_id(image_id)
        self._checked(options)
        want_copies, want_similar = self._modes(options)
        vector = self.retry.call(self.vectors.get_vector, image_id)
        if vector is None:
            raise NotFound(f"No image with id {image_id}.")
        copy_vector = self.retry.call(self.copies.get_vector, image_id) if want_copies and self.copies is not None else None
        if want_copies and copy_vector is None:  # its copy row is missing (added before the copy model): re-add repairs it
            logger.warning("image %s has no copy vector; searching its similar images only", image_id)
        similar = (lambda: SimilarQuery(vector=vector)) if want_similar else None
        return self._search(options, image_id, Timings(), similar, CopyQuery(copy_vector) if copy_vector is not None else None)

    # --- the collection ----------------------------------------------------------------------------
    def problems(self) -> tuple[IndexInfo | None, list[str]]:
        """The collection's info when it can serve, and what is wrong with the backends (never raises
        a backend error: /api/status and readiness show it)."""
        problems: list[str] = []
        info = None
        try:
            self.vectors.ping()
            info = self.vectors.info()
            copies = self._copies()
            if copies is not None:
                copies.ping()
        except SearchError as exc:
            problems.append(exc.message)
        try:
            self.store.ping()
        except SearchError as exc:
            problems.append(exc.message)
        return info, problems

    def rebuild_index(self, spec: IndexSpec) -> IndexInfo:
        """Rebuild the vector index of the similarity collection and, where there is one, the copy collection."""
        info = self.vectors.rebuild_index(spec)
        copies = self._copies()
        if copies is not None:
            copies.rebuild_index(spec)
        return info

    def duplicates(self, offset: int, limit: int, refresh: bool = False) -> DuplicatePage:
        """A page of the collection's duplicate groups (exact, then near by the near-duplicate threshold), on the
        copy vectors where a copy model serves (it is made for this question), else the similarity vectors."""
        threshold = self.thresholds().near_duplicate
        if threshold is None:
            raise InvalidRequest(
                "No near-duplicate threshold is known for this model: set RIS_VERDICT_NEAR_DUPLICATE (python -m "
                "ingest.evaluate on your photos shows the score distributions to choose it from)."
            )
        query = DuplicateQuery(near_threshold=threshold, offset=offset, limit=limit, refresh=refresh)
        return self.retry.call((self._copies() or self.vectors).duplicates, query)

    def browse(self, offset: int, limit: int, label: str | None) -> BrowsePage:
        """A page of the collection, newest first, optionally of one label ("" = images without one)."""
        query = BrowseQuery(offset=offset, limit=limit, label=None if label is None else clean_label(label))
        return self.retry.call(self.vectors.browse, query)

    def labels(self) -> LabelList:
        return self.retry.call(self.vectors.labels)


def _record(prepared: PreparedImage, vectors: np.ndarray, label: str, source: str, created_at: int) -> VectorRecord:
    """The rows Milvus keeps for an image: its vectors (main view first) and everything shown with a hit."""
    if prepared.pixel_hash is None:
        raise ValueError("an image to store is prepared with to_store=True (a query's preparation has no pixel hash)")
    return VectorRecord(
        id=prepared.id, label=label, mime=prepared.mime, width=prepared.width, height=prepared.height,
        size_bytes=len(prepared.data), source=source, created_at=created_at, pixel_hash=prepared.pixel_hash,
        vector=vectors[0].tolist(), views=[vector.tolist() for vector in vectors[1:]],
    )


def _store_blobs(prepared: PreparedImage, store: ImageStore) -> None:
    """Original and thumbnail. Callers write these BEFORE the vector row: only a row marks an image as
    present, so a crash in between leaves a blob to reuse, never a hit without an image."""
    store.put(prepared.id, "original", prepared.data)
    if prepared.thumbnail is not None:
        store.put(prepared.id, "thumbnail", prepared.thumbnail)
