"""The duplicate finder: which images of the collection are the same picture, or edited copies of one another.

- **exact**: the same decoded pixels in different files (a copy with other metadata, a lossless re-save);
  byte-identical files never make two images at all (an image's id is the hash of its bytes).
- **near**: main-view vectors scoring at least the near-duplicate threshold (``Thresholds``), linked into
  groups (if A~B and B~C, one group), each member with its score to the group's first image.

All pairs are compared exactly (blocked float32 matrix products, no index approximation): 100k images of
1280 dims are 10^10 dot products, a few minutes on 2 cores (bench/duplicates_bench.py measures it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from bento.core.errors import SearchError

logger = logging.getLogger(__name__)

# Rows of the similarity matrix computed at once: 2048 x 100k float32 = 800 MB would be too much, so the
# block is sized by the collection (at most ~256 MB of scores at a time).
MAX_BLOCK_CELLS = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageVector:
    """One image's main-view vector (float32) and pixel digest, as the finder reads them from the collection.
    (A numpy row, not a list of Python floats: 100k images of 1280 floats would take ~4 GB as lists.)"""

    id: str
    pixel_hash: str
    vector: np.ndarray


class DuplicateMember(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity to the group's first image (1.0 for that image).")


class DuplicateGroup(BaseModel):
    kind: Literal["exact", "near"]
    members: list[DuplicateMember]


class DuplicateReport(BaseModel):
    image_count: int = Field(description="Images compared.")
    near_duplicate_threshold: float
    exact_groups: int
    near_groups: int
    read_ms: float = Field(description="Reading the vectors from the collection (milliseconds).")
    compare_ms: float = Field(description="Comparing every pair and grouping (milliseconds).")
    groups: list[DuplicateGroup] = Field(description="Exact groups first, then near groups; larger groups first.")


class DuplicatePage(BaseModel):
    state: Literal["ready", "running"]
    total: int = Field(0, description="Groups in the whole report.")
    offset: int = 0
    groups: list[DuplicateGroup] = []
    report: DuplicateReport | None = Field(None, description="The whole report's summary (its groups are paged).")
    has_more: bool = Field(False, description="Whether a next page exists.")
    next_offset: int | None = Field(None, description="The `offset` of the next page (null: this is the last one).")


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(images: Iterable[ImageVector], near_threshold: float) -> DuplicateReport:
    started = time.perf_counter()
    rows = sorted(images, key=lambda image: image.id)  # a stable report for the same collection
    read_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    ids = [row.id for row in rows]
    vectors = np.stack([row.vector for row in rows]).astype(np.float32, copy=False) if rows else np.zeros((0, 0), np.float32)
    hashes = [row.pixel_hash for row in rows]
    del rows
    groups: list[DuplicateGroup] = []

    by_hash: dict[str, list[int]] = {}
    for index, digest in enumerate(hashes):
        if digest:
            by_hash.setdefault(digest, []).append(index)
    exact = [members for members in by_hash.values() if len(members) > 1]
    for members in exact:
        groups.append(DuplicateGroup(kind="exact", members=[DuplicateMember(id=ids[i], score=1.0) for i in members]))

    near_groups: list[DuplicateGroup] = []
    if ids:
        links = _UnionFind(len(ids))
        # An exact group counts once among the near ones: its members are linked already.
        for members in exact:
            for other in members[1:]:
                links.union(members[0], other)
        block = max(1, MAX_BLOCK_CELLS // len(ids))
        for start in range(0, len(ids), block):
            # Only the upper triangle: each pair once (half the work), never an image with itself.
            scores = vectors[start : start + block] @ vectors[start:].T
            for a, b in np.argwhere(scores >= near_threshold):
                if a < b:
                    links.union(int(start + a), int(start + b))
        components: dict[int, list[int]] = {}
        for index in range(len(ids)):
            components.setdefault(links.find(index), []).append(index)
        exact_sets = [set(members) for members in exact]
        for members in components.values():
            if len(members) < 2 or set(members) in exact_sets:
                continue
            first = members[0]
            scores = vectors[members] @ vectors[first]
            near_groups.append(
                DuplicateGroup(
                    kind="near",
                    members=[DuplicateMember(id=ids[i], score=round(float(s), 6)) for i, s in zip(members, scores, strict=True)],
                )
            )
    groups.sort(key=lambda group: -len(group.members))
    near_groups.sort(key=lambda group: -len(group.members))
    report = DuplicateReport(
        image_count=len(ids), near_duplicate_threshold=near_threshold, exact_groups=len(groups), near_groups=len(near_groups),
        read_ms=round(read_ms, 1), compare_ms=round((time.perf_counter() - started) * 1000, 1), groups=[*groups, *near_groups],
    )
    logger.info(
        "Duplicates of %d images: %d exact and %d near groups in %.0f ms", report.image_count, report.exact_groups,
        report.near_groups, report.compare_ms,
    )
    return report


class DuplicateQuery(BaseModel):
    near_threshold: float = Field(ge=-1, le=1)
    offset: int = Field(0, ge=0)
    limit: int = Field(20, ge=1, le=500)
    refresh: bool = Field(False, description="Scan again even if a report exists (the collection changed).")


class DuplicateScans:
    """The duplicate report of a service's collection: computed in a background thread (minutes for a large
    collection: longer than any request may wait), one scan at a time, then paged from memory until a
    refresh is asked for or the threshold changes. A failed scan reports its error once, on the next page."""

    def __init__(self, scan: Callable[[float], DuplicateReport]) -> None:
        self._scan = scan
        self._lock = threading.Lock()
        self._report: DuplicateReport | None = None
        self._failure: SearchError | None = None
        self._running: threading.Thread | None = None

    def _run(self, threshold: float) -> None:
        try:
            report, failure = self._scan(threshold), None
        except SearchError as exc:  # reported to the next caller; anything else is a bug and logs itself
            logger.warning("The duplicate scan failed: %s", exc.message)
            report, failure = None, exc
        with self._lock:
            self._report, self._failure, self._running = report, failure, None

    def page(self, query: DuplicateQuery) -> DuplicatePage:
        with self._lock:
            if self._running is not None:
                return DuplicatePage(state="running")
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            report = self._report
            if report is None or query.refresh or report.near_duplicate_threshold != query.near_threshold:
                self._report = None
                self._running = threading.Thread(target=self._run, args=(query.near_threshold,), name="duplicate-scan", daemon=True)
                self._running.start()
                return DuplicatePage(state="running")
        groups = report.groups[query.offset : query.offset + query.limit]
        more = query.offset + len(groups) < len(report.groups)
        return DuplicatePage(
            state="ready", total=len(report.groups), offset=query.offset, groups=groups,
            report=report.model_copy(update={"groups": []}), has_more=more,
            next_offset=query.offset + len(groups) if more else None,
        )
