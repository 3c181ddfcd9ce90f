"""Offline ingest of an image folder or bucket prefix (ingest/sources.py): batched, resumable, idempotent.

ImageNet-style layout: ``<root>/<label>/.../<image>`` gives each image the label of its top-level
folder; files directly in the root get no label. Images are keyed by content hash, so a rerun (after
Ctrl-C, a crash or SIGKILL) skips what is already in Milvus and never duplicates anything.

Every write goes through the catalog (bento/domain/catalog.py), which owns the write order that makes this
crash-safe: blobs before the vector row, and only a row whose original exists counts as present.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field, computed_field
from tqdm import tqdm

from bento.core.errors import BackendUnavailable, ImageTooLarge, InvalidImage, InvalidRequest, SearchError
from bento.core.ids import content_hash
from bento.domain.catalog import Catalog, NewImage, clean_label
from ingest.sources import FolderSource, ImageSource, SourceFile, is_sidecar, shard_of
from models.pipeline import PreparedImage

logger = logging.getLogger(__name__)


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
    not_images: int = Field(0, description="Sidecar and other known non-image files (.xmp, .txt, .json, ...), skipped.")
    rejected: list[Rejected] = []
    interrupted: bool = False
    seconds: float = 0.0
    image_count: int = Field(-1, description="Images in the collection after the run (-1: not read).")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def handled(self) -> int:
        """This shard's files that were dealt with (added, present already, duplicate or rejected)."""
        return self.ingested + self.skipped_existing + self.duplicates + len(self.rejected)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def files_per_s(self) -> float:
        """The one rate: files handled per second, as the progress bar counts them (a rerun that finds
        everything present is fast, and says so, rather than reporting 0 images/s)."""
        return round(self.handled / self.seconds, 1) if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"Ingest of {self.folder} with {self.model}{' (INTERRUPTED: rerun to finish)' if self.interrupted else ''}",
            f"  scanned           {self.scanned}",
            f"  ingested          {self.ingested}",
            f"  already present   {self.skipped_existing}",
            f"  duplicate files   {self.duplicates}",
            *([f"  other shards      {self.other_shards}"] if self.other_shards else []),
            *([f"  not images        {self.not_images}  (sidecar files: .xmp, .txt, .json, ...)"] if self.not_images else []),
            f"  rejected          {len(self.rejected)}",
        ]
        lines += [f"    {r.path}: {r.reason}" for r in self.rejected[:50]]
        if len(self.rejected) > 50:
            lines.append(f"    ... and {len(self.rejected) - 50} more")
        lines.append(f"  rate              {self.files_per_s:.1f} files/s  ({self.handled} files in {self.seconds:.1f} s)")
        if self.image_count >= 0:
            lines.append(f"  collection now    {self.image_count} images")
        return "\n".join(lines)


@dataclass
class IngestOptions:
    batch_size: int = 32
    workers: int = max(1, min(4, os.cpu_count() or 1))
    progress: bool = True
    # Sharding for parallel jobs (a Kubernetes Indexed Job): this run takes only the files whose name
    # falls in its shard, so N pods split any source without coordination, each reading only its share.
    shard_index: int = 0
    shard_count: int = 1


@dataclass
class _Item:
    file: SourceFile
    label: str
    prepared: PreparedImage | None = None
    existing: bool = False
    error: str | None = None


@dataclass
class _Chunk:
    items: list[_Item] = field(default_factory=list)


def check_shard(shard_index: int, shard_count: int) -> None:
    if not 0 <= shard_index < shard_count:
        raise SearchError(f"shard index {shard_index} is outside 0..{shard_count - 1}")


def scan_folder(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, label) for every regular file of a folder that is neither hidden nor a sidecar, in a stable order."""
    source = FolderSource(root)
    for file in source.files():
        if not is_sidecar(file.name):
            yield source.root / file.name, file.label


class IngestJob:
    """Reads, decodes and preprocesses files in threads (bounded look-ahead) while the catalog embeds and
    writes in the main thread. Retrying an unavailable backend is the catalog's policy (its ``retry``)."""

    def __init__(self, catalog: Catalog, options: IngestOptions | None = None) -> None:
        self.catalog = catalog
        self.options = options or IngestOptions()

    def _read(self, source: ImageSource, file: SourceFile) -> bytes:
        """A file's bytes; an outage of the source is ridden out like any other (the catalog's policy)."""
        return self.catalog.retry.call(source.read, file)

    # Runs in worker threads (on this shard's files): read, hash, check presence, decode and preprocess.
    def _prepare_chunk(self, source: ImageSource, files: list[SourceFile]) -> _Chunk:
        chunk = _Chunk()
        loaded: list[tuple[_Item, bytes, str]] = []
        max_bytes = self.catalog.decode_limits.max_bytes
        for file in files:
            item = _Item(file=file, label=file.label)
            chunk.items.append(item)
            try:
                item.label = clean_label(file.label)
                if file.size > max_bytes:
                    raise ImageTooLarge(f"{file.size} bytes; the limit is {max_bytes}")
                data = self._read(source, file)
            except BackendUnavailable:
                raise  # the source is down past the retry budget: stop, a rerun continues
            except (OSError, SearchError) as exc:
                item.error = getattr(exc, "message", None) or f"cannot read: {exc}"
                continue
            loaded.append((item, data, content_hash(data)))
        complete = self.catalog.complete_ids([image_id for _, _, image_id in loaded])
        for item, data, image_id in loaded:
            if image_id in complete:
                item.existing = True
                continue
            try:
                item.prepared = self.catalog.prepare(data, to_store=True)
            except (InvalidImage, ImageTooLarge, InvalidRequest) as exc:
                item.error = exc.message
        return chunk

    def run(self, source: ImageSource | Path) -> IngestReport:
        """Ingest every file of ``source`` (a folder path is a FolderSource) that falls in this shard."""
        check_shard(self.options.shard_index, self.options.shard_count)
        if isinstance(source, Path):
            source = FolderSource(source)
        report = IngestReport(folder=source.location, model=self.catalog.model().model_id)
        listed = list(self.catalog.retry.call(lambda: list(source.files())))
        report.scanned = len(listed)
        images = [file for file in listed if not is_sidecar(file.name)]
        report.not_images, listed = len(listed) - len(images), images
        # This shard's files only, before batching: every batch is full, whatever the number of shards.
        files = [file for file in listed if shard_of(file.name, self.options.shard_count) == self.options.shard_index]
        report.other_shards = len(listed) - len(files)
        self.catalog.ensure_ready()
        started = time.perf_counter()
        batch = self.options.batch_size
        chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
        seen: set[str] = set()
        bar = tqdm(total=len(files), unit="file", disable=not self.options.progress, desc="ingest", dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="ingest-decode")
        pending: deque[Future[_Chunk]] = deque()
        lookahead = self.options.workers + 1  # bounded: memory stays at a few chunks of pixels
        next_chunk = 0
        try:
            while next_chunk < len(chunks) or pending:
                while next_chunk < len(chunks) and len(pending) < lookahead:
                    pending.append(pool.submit(self._prepare_chunk, source, chunks[next_chunk]))
                    next_chunk += 1
                chunk = pending.popleft().result()
                self._write_chunk(chunk, seen, report)
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
            self.catalog.retry.call(self.catalog.vectors.flush)
        report.image_count = self.catalog.retry.call(self.catalog.vectors.count)
        return report

    def _write_chunk(self, chunk: _Chunk, seen: set[str], report: IngestReport) -> None:
        fresh: list[NewImage] = []
        for item in chunk.items:
            if item.error is not None:
                report.rejected.append(Rejected(path=item.file.name, reason=item.error))
            elif item.existing:
                report.skipped_existing += 1
            elif item.prepared is not None:
                if item.prepared.id in seen:
                    report.duplicates += 1
                    continue
                seen.add(item.prepared.id)
                fresh.append(NewImage(item.prepared, item.label, item.file.name))
        # New images and half-written ones (a row without its original) alike: the catalog repairs the latter.
        report.ingested += len(self.catalog.add_many(fresh))
