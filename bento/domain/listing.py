"""The collection's listing: every image's id, label and date, for the gallery (newest first, paged, by
label) and the label counts.

Milvus can neither sort a query nor group one, so the listing is one scan of the main-view rows kept in
memory as compact arrays (44 bytes an image: 44 MB for a million), refreshed in the background. Writes made
through this process are applied to it at once (what a person just added or deleted shows on the next page);
writes made elsewhere (a local ingest job writing to Milvus directly) show after the next refresh, at most
``max_age_s`` later plus the scan. A scan reads about 7,000 rows a second from Milvus Lite here, far more
from a server: until the first one is done the listing answers state "scanning".
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from bento.core.errors import SearchError
from bento.domain.schemas import MAX_LABEL_LENGTH, ImageMetadata, PreciseUnixTime

logger = logging.getLogger(__name__)

ListingState = Literal["ready", "scanning"]
# How long a request waits for a first scan before it answers "scanning" (small collections: at once).
FIRST_SCAN_WAIT_S = 5.0
# Writes kept aside before they are folded into the snapshot (one re-sort for many).
MAX_PENDING_WRITES = 10_000


@dataclass(frozen=True)
class ListedImage:
    id: str  # 64 hex digits (a sha256)
    label: str
    created_at: int


class BrowseQuery(BaseModel):
    offset: int = Field(0, ge=0)
    limit: int = Field(24, ge=1, le=200)
    label: str | None = Field(None, max_length=MAX_LABEL_LENGTH, description="Only images with this label.")


class BrowsePage(BaseModel):
    """A page of the collection, newest first."""

    state: ListingState
    total: int = Field(0, description="Images in the collection (with the label, when one is given).")
    offset: int = 0
    limit: int = 0
    label: str | None = None
    images: list[ImageMetadata] = Field(default_factory=list)
    as_of: PreciseUnixTime | None = Field(
        None, description="When the scan behind this page was made (ISO 8601, UTC; writes through this service show at once)."
    )


class LabelCount(BaseModel):
    label: str = Field(description='The label ("" for images without one).')
    image_count: int = Field(description="Images with this label.")


class LabelList(BaseModel):
    state: ListingState
    labels: list[LabelCount] = Field(default_factory=list, description="Most used first (this page of them).")
    image_count: int = Field(0, description="Images in the collection.")
    total: int = Field(0, description="Labels in use (the whole list this page belongs to).")
    offset: int = 0
    has_more: bool = Field(False, description="Whether a next page exists.")
    next_offset: int | None = Field(None, description="The `offset` of the next page (null: this is the last one).")
    as_of: PreciseUnixTime | None = Field(None, description="When the scan behind this list was made (ISO 8601, UTC).")


def _raw_ids(ids: Iterable[str]) -> np.ndarray:
    """Image ids (64 hex digits) as 32-byte strings: every id is exactly 32 bytes, so numpy's padding of
    ``S32`` cannot make two ids equal; element access strips trailing zero bytes, ``_hex`` puts them back."""
    return np.array([bytes.fromhex(image_id) for image_id in ids], dtype="S32")


def _hex(raw: bytes) -> str:
    return raw.ljust(32, b"\0").hex()


@dataclass
class _Snapshot:
    """Arrays, newest first: ids, label codes into ``labels`` (sorted), dates. Replaced, never changed."""

    ids: np.ndarray  # (n,) S32
    codes: np.ndarray  # (n,) int32
    created: np.ndarray  # (n,) int64
    labels: list[str]
    as_of: float

    @classmethod
    def of(cls, images: Iterable[ListedImage], as_of: float) -> _Snapshot:
        """Built as the scan streams: compact buffers (44 bytes an image), no list of objects."""
        raw_ids, created, codes = bytearray(), array("q"), array("i")
        code_of: dict[str, int] = {}
        for image in images:
            raw_ids += bytes.fromhex(image.id)
            created.append(image.created_at)
            codes.append(code_of.setdefault(image.label, len(code_of)))
        labels = sorted(code_of)  # codes in label order: label_counts and page need no mapping
        position = {label: index for index, label in enumerate(labels)}
        recode = np.array([position[label] for label in code_of], dtype=np.int32)
        ids = np.frombuffer(bytes(raw_ids), dtype="S32")
        in_order = recode[np.frombuffer(codes, dtype=np.int32)] if len(codes) else np.zeros(0, dtype=np.int32)
        return cls._sorted(ids, in_order, np.frombuffer(created, dtype=np.int64).copy(), labels, as_of)

    @classmethod
    def _sorted(cls, ids: np.ndarray, codes: np.ndarray, created: np.ndarray, labels: list[str], as_of: float) -> _Snapshot:
        # Newest first; the id breaks ties (a batch shares its second), so pages are stable.
        order = np.lexsort((ids, -created))
        return cls(ids[order], codes[order], created[order], labels, as_of)

    def changed(self, upserted: dict[str, ListedImage], deleted: set[str]) -> _Snapshot:
        """This snapshot with writes applied (vectorised: a million images take a fraction of a second)."""
        if not upserted and not deleted:
            return self
        keep = ~np.isin(self.ids, _raw_ids(deleted | set(upserted)))
        added = sorted(upserted.values(), key=lambda image: (-image.created_at, image.id))
        labels = sorted(set(self.labels) | {image.label for image in added})
        code_of = {label: code for code, label in enumerate(labels)}
        recode = np.array([code_of[label] for label in self.labels], dtype=np.int32)
        codes = np.concatenate([recode[self.codes[keep]] if len(recode) else self.codes[keep],
                                np.array([code_of[image.label] for image in added], dtype=np.int32)])
        created = np.concatenate([self.created[keep], np.array([image.created_at for image in added], dtype=np.int64)])
        ids = np.concatenate([self.ids[keep], _raw_ids(image.id for image in added)])
        kept = int(keep.sum())
        if added and kept and added[-1].created_at > self.created[keep][0]:
            # The usual case (new uploads, all newer than the listing): put them first, no full re-sort.
            order = np.concatenate([np.arange(kept, len(ids)), np.arange(kept)])
            return _Snapshot(ids[order], codes[order], created[order], labels, self.as_of)
        return _Snapshot._sorted(ids, codes, created, labels, self.as_of)

    def page(self, label: str | None, offset: int, limit: int) -> tuple[int, list[str]]:
        if label is None:
            rows = np.arange(len(self.codes))
        elif label in self.labels:
            rows = np.flatnonzero(self.codes == self.labels.index(label))
        else:
            rows = np.arange(0)
        chosen = rows[offset : offset + limit]
        return len(rows), [_hex(self.ids[row]) for row in chosen]

    def label_counts(self) -> list[LabelCount]:
        counts = np.bincount(self.codes, minlength=len(self.labels))
        listed = [LabelCount(label=label, image_count=int(count)) for label, count in zip(self.labels, counts, strict=True) if count]
        return sorted(listed, key=lambda entry: (-entry.image_count, entry.label))


@dataclass
class _Changes:
    """Writes made through this process, applied to the snapshot on the next read (one re-sort for many)."""

    upserted: dict[str, ListedImage] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    def upsert(self, images: Iterable[ListedImage]) -> None:
        for image in images:
            self.deleted.discard(image.id)
            self.upserted[image.id] = image

    def delete(self, ids: Iterable[str]) -> None:
        for image_id in ids:
            self.upserted.pop(image_id, None)
            self.deleted.add(image_id)


class CollectionListing:
    """The listing of one collection: ``scan`` reads every image (id, label, date) from Milvus."""

    def __init__(self, scan: Callable[[], Iterable[ListedImage]], max_age_s: float = 60.0) -> None:
        self._scan = scan
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._pending = _Changes()  # writes not yet applied to the snapshot
        self._during_scan: _Changes | None = None  # writes made while a scan runs: re-applied on its result
        self._scanning: threading.Thread | None = None
        self._first_scan = threading.Event()
        self._failure: SearchError | None = None
        self._generation = 0  # bumped by invalidate: a scan started before it is thrown away
        self._last_scan_s = 0.0

    def start(self) -> None:
        """Read the listing in the background now, unless it is read or being read: a service calls this once
        its collection is ready, so that the writes it takes from then on are kept for the listing (before a
        first snapshot nothing is kept, and a first scan begun just after a write may not see it yet)."""
        with self._lock:
            if self._snapshot is None:
                self._start_scan()

    # --- writes made through this process ---------------------------------------------------------------
    def upserted(self, images: Iterable[ListedImage]) -> None:
        images = list(images)
        self._record(lambda changes: changes.upsert(images))

    def deleted(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        self._record(lambda changes: changes.delete(ids))

    def _record(self, change: Callable[[_Changes], None]) -> None:
        """A write: replayed on a scan that runs now, pending for the snapshot there is (none: nothing kept)."""
        with self._lock:
            if self._during_scan is not None:
                change(self._during_scan)
            if self._snapshot is not None:
                change(self._pending)
                self._fold_if_large()

    def _fold_if_large(self) -> None:
        """Apply the pending writes now when many wait (an ingest through a service nobody browses), so
        they never hold more memory than the snapshot. Before any snapshot (a process that never lists,
        like the ingest job) nothing is kept: the first scan reads everything from Milvus."""
        if len(self._pending.upserted) + len(self._pending.deleted) >= MAX_PENDING_WRITES:
            self._snapshot = self._snapshot.changed(self._pending.upserted, self._pending.deleted)  # type: ignore[union-attr]
            self._pending = _Changes()

    def invalidate(self) -> None:
        """Forget everything (the collection was replaced): the next read scans again."""
        with self._lock:
            self._snapshot, self._pending, self._generation = None, _Changes(), self._generation + 1
            self._failure, self._scanning, self._during_scan = None, None, None  # a running scan is left to finish unheard
            self._first_scan.clear()

    # --- scanning ---------------------------------------------------------------------------------
    def _run_scan(self, generation: int) -> None:
        started = time.time()
        snapshot: _Snapshot | None = None
        failure: SearchError | None = None
        try:
            snapshot = _Snapshot.of(self._scan(), started)
            logger.info("Listed %d images in %.1f s", len(snapshot.codes), time.time() - started)
        except SearchError as exc:  # reported to the next reader
            logger.warning("Listing the collection failed: %s", exc.message)
            failure = exc
        except Exception as exc:  # a bug or an unexpected client error: logged whole, reported, never a stuck scan
            logger.exception("Listing the collection failed")
            failure = SearchError(f"Listing the collection failed ({exc.__class__.__name__}); see the service's log.")
        finally:
            with self._lock:
                if generation == self._generation:  # else invalidate() has let a newer scan start
                    during_scan = self._during_scan or _Changes()
                    self._during_scan, self._scanning = None, None
                    self._last_scan_s = time.time() - started
                    if snapshot is not None:  # the writes made while it ran may or may not be in it: apply them again
                        replay = _Changes()
                        for changes in (self._pending, during_scan):
                            replay.delete(changes.deleted)
                            replay.upsert(changes.upserted.values())
                        self._snapshot, self._pending = snapshot, replay
                    self._failure = failure
                    self._first_scan.set()

    def _start_scan(self) -> None:
        """Start a background scan unless one runs (with the lock held)."""
        if self._scanning is None:
            self._during_scan = _Changes()
            self._scanning = threading.Thread(
                target=self._run_scan, args=(self._generation,), name="collection-listing", daemon=True
            )
            self._scanning.start()

    def _current(self) -> _Snapshot | None:
        """The snapshot with this process's writes applied, starting a refresh when it is old."""
        with self._lock:
            # A listing that takes long to read is refreshed less often (never back to back).
            max_age = max(self.max_age_s, 2 * self._last_scan_s)
            if self._snapshot is None or time.time() - self._snapshot.as_of > max_age:
                self._start_scan()
        if self._snapshot is None:
            self._first_scan.wait(FIRST_SCAN_WAIT_S)
        with self._lock:
            if self._failure is not None and self._snapshot is None:
                failure, self._failure = self._failure, None
                self._first_scan.clear()
                raise failure
            if self._snapshot is None:
                return None
            self._snapshot = self._snapshot.changed(self._pending.upserted, self._pending.deleted)
            self._pending = _Changes()
            return self._snapshot

    # --- reading ------------------------------------------------------------------------------------
    def page(self, query: BrowseQuery) -> tuple[BrowsePage, list[str]]:
        """A page (without metadata: the caller reads it for the returned ids, in order)."""
        snapshot = self._current()
        if snapshot is None:
            return BrowsePage(state="scanning", offset=query.offset, limit=query.limit, label=query.label), []
        total, ids = snapshot.page(query.label, query.offset, query.limit)
        page = BrowsePage(state="ready", total=total, offset=query.offset, limit=query.limit, label=query.label, as_of=snapshot.as_of)
        return page, ids

    def labels(self) -> LabelList:
        snapshot = self._current()
        if snapshot is None:
            return LabelList(state="scanning")
        return LabelList(state="ready", labels=snapshot.label_counts(), image_count=len(snapshot.codes), as_of=snapshot.as_of)
