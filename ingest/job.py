"""Offline ingest of an image folder: batched, resumable, idempotent.

ImageNet-style layout: ``<root>/<label>/.../<image>`` gives each image the label of its top-level
folder; files directly in the root get no label. Images are keyed by content hash, so a rerun (after
Ctrl-C, a crash or SIGKILL) skips what is already in Milvus and never duplicates anything.

Crash safety comes from the write order: the blob (original + thumbnail) is stored before the vector
row, and only a vector row marks an image as done. An image whose blob went missing is re-ingested.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from pydantic import BaseModel
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_delay,
    wait_exponential,
)
from tqdm import tqdm

from bento.config import Settings
from bento.errors import BackendUnavailable, ImageTooLarge, InvalidImage, MilvusLiteLocked, SearchError
from bento.imaging import DecodeLimits, content_hash
from bento.schemas import MAX_LABEL_LENGTH, ModelInfo, VectorRecord
from bento.storage import ImageStore
from bento.vectors import VectorIndex
from models.pipeline import PreparedImage, prepare_image
from models.preprocess import Preprocessing

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Embedding(Protocol):
    """Where vectors come from: the local model, or a running service (--service-url)."""

    info: ModelInfo
    preprocessing: Preprocessing

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...


class Rejected(BaseModel):
    path: str
    reason: str


class IngestReport(BaseModel):
    folder: str
    model: str
    scanned: int = 0
    ingested: int = 0
    skipped_existing: int = 0
    duplicates: int = 0
    other_shards: int = 0
    rejected: list[Rejected] = []
    interrupted: bool = False
    seconds: float = 0.0
    collection_count: int = -1

    @property
    def images_per_s(self) -> float:
        return self.ingested / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"Ingest of {self.folder} with {self.model}{' (INTERRUPTED: rerun to finish)' if self.interrupted else ''}",
            f"  scanned           {self.scanned}",
            f"  ingested          {self.ingested}  ({self.images_per_s:.1f} images/s over {self.seconds:.1f} s)",
            f"  already present   {self.skipped_existing}",
            f"  duplicate files   {self.duplicates}",
            *([f"  other shards      {self.other_shards}"] if self.other_shards else []),
            f"  rejected          {len(self.rejected)}",
        ]
        lines += [f"    {r.path}: {r.reason}" for r in self.rejected[:50]]
        if len(self.rejected) > 50:
            lines.append(f"    ... and {len(self.rejected) - 50} more")
        if self.collection_count >= 0:
            lines.append(f"  collection now    {self.collection_count} images")
        return "\n".join(lines)


@dataclass
class IngestOptions:
    batch_size: int = 32
    workers: int = max(1, min(4, os.cpu_count() or 1))
    progress: bool = True
    # How long to keep retrying (with exponential backoff) while Milvus or the store is unavailable,
    # before stopping with a clear message; a rerun continues where it stopped.
    retry_s: float = 60.0
    # Sharding for parallel jobs (a Kubernetes Indexed Job): this run takes only the images whose
    # content hash falls in its shard, so N pods split any folder without coordination or overlap.
    shard_index: int = 0
    shard_count: int = 1


@dataclass
class _Item:
    path: Path
    label: str
    prepared: PreparedImage | None = None
    existing: bool = False
    other_shard: bool = False
    error: str | None = None


@dataclass
class _Chunk:
    items: list[_Item] = field(default_factory=list)


def in_shard(image_id: str, shard_index: int, shard_count: int) -> bool:
    """Stable assignment of an image to one of shard_count shards by its content hash."""
    if not 0 <= shard_index < shard_count:
        raise SearchError(f"shard index {shard_index} is outside 0..{shard_count - 1}")
    return int(image_id[:16], 16) % shard_count == shard_index


def scan_folder(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, label) for every non-hidden regular file, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        relative = here.relative_to(root)
        label = relative.parts[0] if relative.parts else ""
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name, label


class IngestJob:
    def __init__(
        self,
        settings: Settings,
        embedding: Embedding,
        store: ImageStore,
        vectors: VectorIndex,
        options: IngestOptions | None = None,
    ) -> None:
        self.settings = settings
        self.embedding = embedding
        self.store = store
        self.vectors = vectors
        self.options = options or IngestOptions()
        self.limits = DecodeLimits(settings.max_upload_bytes, settings.max_image_pixels)

    def _retry(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn again while a backend is unavailable (idempotent steps only), then give up clearly."""
        retrying = Retrying(
            # Outages are worth waiting for; a Lite file owned by another process is not.
            retry=retry_if_exception_type(BackendUnavailable) & retry_if_not_exception_type(MilvusLiteLocked),
            wait=wait_exponential(multiplier=0.5, max=10),
            stop=stop_after_delay(self.options.retry_s),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        )
        return retrying(fn, *args)

    def _present(self, ids: list[str]) -> set[str]:
        """Ids whose vector row AND original blob exist: those are complete and skipped."""
        in_milvus = self.vectors.existing_ids(ids)
        return {image_id for image_id in in_milvus if self.store.exists(image_id, "original")}

    # Runs in worker threads: read, hash, check presence, decode and preprocess one chunk.
    def _prepare_chunk(self, files: list[tuple[Path, str]]) -> _Chunk:
        chunk = _Chunk()
        loaded: list[tuple[_Item, bytes, str]] = []
        for path, label in files:
            item = _Item(path=path, label=label[:MAX_LABEL_LENGTH])
            chunk.items.append(item)
            try:
                size = path.stat().st_size
                if size > self.limits.max_bytes:
                    raise ImageTooLarge(f"{size} bytes; the limit is {self.limits.max_bytes}")
                data = path.read_bytes()
            except (OSError, SearchError) as exc:
                item.error = getattr(exc, "message", None) or f"cannot read: {exc}"
                continue
            image_id = content_hash(data)
            if not in_shard(image_id, self.options.shard_index, self.options.shard_count):
                item.other_shard = True
                continue
            loaded.append((item, data, image_id))
        present = self._retry(self._present, [image_id for _, _, image_id in loaded])
        for item, data, image_id in loaded:
            if image_id in present:
                item.existing = True
                continue
            try:
                item.prepared = prepare_image(
                    data,
                    self.limits,
                    self.embedding.preprocessing,
                    self.settings.thumbnail_size,
                    self.settings.decode_draft_scale,
                )
            except (InvalidImage, ImageTooLarge) as exc:
                item.error = exc.message
        return chunk

    def run(self, folder: Path) -> IngestReport:
        folder = folder.resolve()
        if not folder.is_dir():
            raise SearchError(f"{folder} is not a folder.")
        report = IngestReport(folder=str(folder), model=self.embedding.info.model_id)
        files = list(scan_folder(folder))
        report.scanned = len(files)
        self._retry(self.vectors.ensure_ready)
        started = time.perf_counter()
        batch = self.options.batch_size
        chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
        seen: set[str] = set()
        bar = tqdm(total=len(files), unit="img", disable=not self.options.progress, desc="ingest", dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="ingest-decode")
        pending: deque[Future[_Chunk]] = deque()
        lookahead = self.options.workers + 1  # bounded: memory stays at a few chunks of pixels
        next_chunk = 0
        try:
            while next_chunk < len(chunks) or pending:
                while next_chunk < len(chunks) and len(pending) < lookahead:
                    pending.append(pool.submit(self._prepare_chunk, chunks[next_chunk]))
                    next_chunk += 1
                chunk = pending.popleft().result()
                self._write_chunk(chunk, folder, seen, report)
                bar.update(len(chunk.items))
                bar.set_postfix(new=report.ingested, skipped=report.skipped_existing, rejected=len(report.rejected))
        except KeyboardInterrupt:
            report.interrupted = True
            logger.warning("Interrupted: everything written so far is complete; rerun to continue.")
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            report.seconds = round(time.perf_counter() - started, 3)
        if not report.interrupted:
            self._retry(self.vectors.flush)
        report.collection_count = self._retry(self.vectors.count)
        return report

    def _persist(self, prepared: list[PreparedImage], records: list[VectorRecord]) -> None:
        """Blobs first, then vector rows: only a vector row marks an image done (crash safety)."""
        for image in prepared:
            image.store_blobs(self.store)
        self.vectors.upsert(records)

    def _write_chunk(self, chunk: _Chunk, root: Path, seen: set[str], report: IngestReport) -> None:
        fresh: list[tuple[_Item, PreparedImage]] = []
        for item in chunk.items:
            if item.error is not None:
                report.rejected.append(Rejected(path=str(item.path.relative_to(root)), reason=item.error))
            elif item.other_shard:
                report.other_shards += 1
            elif item.existing:
                report.skipped_existing += 1
            elif item.prepared is not None:
                if item.prepared.id in seen:
                    report.duplicates += 1
                    continue
                seen.add(item.prepared.id)
                fresh.append((item, item.prepared))
        if not fresh:
            return
        vectors = self.embedding.embed(np.stack([prepared.pixels for _, prepared in fresh]))
        now = int(time.time())
        records = [
            prepared.record(vector, item.label, str(item.path.relative_to(root)), now)
            for (item, prepared), vector in zip(fresh, vectors, strict=True)
        ]
        self._retry(self._persist, [prepared for _, prepared in fresh], records)
        report.ingested += len(records)
