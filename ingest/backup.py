"""Back up the collection (every image's vectors and metadata, both models' collections) into a folder, and
restore it into an empty or existing Milvus: Lite, standalone or a cluster, of this version or a later one.

    ris backup /backups [--images]          writes /backups/ris-backup-20261207T155056Z/
    ris restore /backups/ris-backup-...     or /backups: the newest complete backup in it

Why not only Milvus' own files (etcd + its bucket)? Those restore into the same Milvus version and layout
only, all collections at once, and must be taken together while nothing writes. This backup is the
product's own: restoring it costs an upsert per image (no re-embedding: hours on a CPU for millions), into
any Milvus, and it is checked (a digest per file) before anything is written. With ``--images`` it holds
the originals and thumbnails too (a laptop's local store); in a cluster the image bucket is mirrored by
`mc mirror` instead (k8s/README.md, "Backup and restore"), incrementally and server-side.

A backup is written into ``<name>.partial`` and renamed when complete: an interrupted one never looks
complete. It is consistent per image (an image is in it whole or not at all), not a point in time: images
added while it runs may be missing from it. A restore is idempotent (images are keyed by content), so it
can be rerun after a failure, and merging into a collection that has images already is safe."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from bento.adapters.storage import open_image_store
from bento.adapters.vectors import SCHEMA_VERSION, VectorIndex, copy_collection, recorded_model
from bento.core.cli import UsageError, run_tool
from bento.core.config import Settings
from bento.core.errors import InvalidRequest, ModelMismatch
from bento.core.iterate import batched
from bento.core.output import print_result
from bento.core.retry import RetryPolicy
from bento.domain.ports import ImageStore, Kind
from bento.domain.schemas import IndexSpec, VectorRecord
from models.info import ModelInfo

logger = logging.getLogger(__name__)

FORMAT = "ris-backup"
FORMAT_VERSION = 1
PREFIX = "ris-backup-"
PARTIAL = ".partial"
KINDS: tuple[Kind, ...] = ("original", "thumbnail")
Role = Literal["similarity", "copy"]


class Chunk(BaseModel):
    file: str
    images: int
    sha256: str


class CollectionBackup(BaseModel):
    role: Role
    name: str = Field(description="The collection's name when it was backed up (a restore uses the settings' name).")
    model: ModelInfo
    index: IndexSpec
    image_count: int = 0
    chunks: list[Chunk] = Field(default_factory=list)


class Manifest(BaseModel):
    format: Literal["ris-backup"] = FORMAT
    version: int = FORMAT_VERSION
    created_at: str = Field(description="When the backup started (ISO 8601, UTC).")
    collections: list[CollectionBackup]
    images: bool = Field(False, description="Whether the originals and thumbnails are in it (images/).")


class _Report(BaseModel):
    path: str
    collections: dict[str, int] = Field(description="Images per collection role (similarity, copy).")
    duration_ms: float = 0.0

    def _first_line(self, verb: str, where: str) -> str:
        counts = ", ".join(f"{count} images ({role})" for role, count in self.collections.items())
        return f"{verb} {counts} {where} {self.path} in {self.duration_ms / 1000:.1f} s."


class BackupReport(_Report):
    images_copied: int = 0
    missing_originals: int = Field(0, description="Images whose original was gone from the store (left out).")

    def summary(self) -> str:
        lines = [self._first_line("Backed up", "into")]
        if self.images_copied:
            lines.append(f"Originals and thumbnails of {self.images_copied} images copied.")
        if self.missing_originals:
            lines.append(f"{self.missing_originals} images had no original in the store and were left out.")
        return "\n".join(lines)


class RestoreReport(_Report):
    images_restored: int = 0

    def summary(self) -> str:
        lines = [self._first_line("Restored", "from")]
        if self.images_restored:
            lines.append(f"Originals and thumbnails of {self.images_restored} images put back.")
        return "\n".join(lines)


def _image_path(root: Path, image_id: str, kind: Kind) -> Path:
    return root / "images" / kind / image_id[:2] / image_id


def _write_chunk(folder: Path, file: str, records: list[tuple[dict[str, object], np.ndarray]]) -> Chunk:
    """One .npz of whole images: their metadata as JSON (bytes) and their vectors (images x views x dim)."""
    metadata = json.dumps([meta for meta, _ in records]).encode()
    buffer = io.BytesIO()
    np.savez(buffer, metadata=np.frombuffer(metadata, dtype=np.uint8), vectors=np.stack([v for _, v in records]))
    data = buffer.getvalue()
    (folder / file).write_bytes(data)
    return Chunk(file=file, images=len(records), sha256=hashlib.sha256(data).hexdigest())


def _read_chunk(folder: Path, chunk: Chunk) -> tuple[list[dict[str, object]], np.ndarray]:
    path = folder / chunk.file
    if not path.is_file():
        raise InvalidRequest(f"The backup is incomplete: {chunk.file} is missing from {folder}.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise InvalidRequest(f"The backup is damaged: {chunk.file} does not match its digest in manifest.json.")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:  # never pickles: a backup is data only
        metadata = json.loads(arrays["metadata"].tobytes())
        vectors = arrays["vectors"]
    if len(metadata) != chunk.images or vectors.shape[0] != chunk.images:
        raise InvalidRequest(f"The backup is damaged: {chunk.file} holds {len(metadata)} images, its manifest says {chunk.images}.")
    return metadata, vectors


def _collections(settings: Settings, retry: RetryPolicy) -> list[tuple[Role, VectorIndex]]:
    """The collections to back up, opened with the model facts they record (no model is loaded)."""
    name = settings.milvus.collection
    opened: list[tuple[Role, VectorIndex]] = []
    for role, collection in (("similarity", name), ("copy", copy_collection(name))):
        probe = VectorIndex(settings, _PLACEHOLDER, collection)
        try:
            properties = retry.call(probe.properties_of, collection)
        finally:
            probe.close()
        if properties is None:
            if role == "similarity":
                raise UsageError(f"There is no collection '{name}' to back up (RIS_MILVUS_COLLECTION, RIS_MILVUS_URI).")
            continue
        model = recorded_model(properties)
        if model is None:
            raise ModelMismatch(f"Collection '{collection}' was not made by this product; nothing to back up.")
        if properties.get("ris.schema_version", "1") != SCHEMA_VERSION:
            raise ModelMismatch(f"Collection '{collection}' has an older layout: run `ris reembed` once, then back up.")
        opened.append((role, VectorIndex(settings, model, collection)))  # type: ignore[arg-type]
    return opened


# Only to read a collection's properties (which needs a connection, not a model).
_PLACEHOLDER = ModelInfo(backbone="-", model_id="-", dim=1, preprocessing="-", weights="-", pretrained=False)


def backup(settings: Settings, destination: Path, *, images: bool, retry: RetryPolicy, batch_size: int = 500) -> BackupReport:
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    final = destination / f"{PREFIX}{stamp}"
    folder = destination / f"{PREFIX}{stamp}{PARTIAL}"
    if final.exists():
        raise UsageError(f"{final} exists already; wait a second and rerun.")
    store: ImageStore | None = open_image_store(settings) if images else None
    opened = _collections(settings, retry)  # first: a usage error leaves no folder behind
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(created_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"), collections=[], images=images)
    report = BackupReport(path=str(final), collections={})
    copied: set[str] = set()
    try:
        for role, index in opened:
            entry = CollectionBackup(role=role, name=index.settings.milvus.collection, model=index.model, index=retry.call(index.index_in_use))
            for batch in batched(index.records(batch_size), batch_size):
                kept = []
                for meta, pixel_hash, vectors in batch:
                    if store is not None and meta.id not in copied:
                        if not _copy_out(store, folder, meta.id, retry):
                            report.missing_originals += 1
                            continue
                        copied.add(meta.id)
                    kept.append(({**meta.model_dump(), "pixel_hash": pixel_hash}, vectors))
                if kept:
                    entry.chunks.append(_write_chunk(folder, f"{role}-{len(entry.chunks):05d}.npz", kept))
                    entry.image_count += len(kept)
            manifest.collections.append(entry)
            report.collections[role] = entry.image_count
            logger.info("Backed up %d images of '%s'", entry.image_count, entry.name)
        (folder / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        os.replace(folder, final)  # complete: only now does it look like a backup
    finally:
        for _, index in opened:
            index.close()
    report.images_copied = len(copied)
    report.duration_ms = round((time.perf_counter() - started) * 1000, 1)
    return report


def _copy_out(store: ImageStore, folder: Path, image_id: str, retry: RetryPolicy) -> bool:
    """The original and thumbnail of one image into the backup; False when its original is gone."""
    if not retry.call(store.exists, image_id, "original"):
        return False
    for kind in KINDS:
        if kind == "thumbnail" and not retry.call(store.exists, image_id, kind):
            continue  # rebuilt from the original by the next add; not worth failing a backup for
        path = _image_path(folder, image_id, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(retry.call(store.get, image_id, kind))
    return True


def find_backup(location: Path) -> Path:
    """A backup folder, or the newest complete backup inside ``location``."""
    if (location / "manifest.json").is_file():
        return location
    if not location.is_dir():
        raise UsageError(f"{location} is not a folder.")
    complete = sorted(p for p in location.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(PARTIAL) and (p / "manifest.json").is_file())
    if not complete:
        raise UsageError(f"{location} holds no complete backup (a {PREFIX}* folder with a manifest.json).")
    return complete[-1]


def read_manifest(folder: Path) -> Manifest:
    try:
        return Manifest.model_validate_json((folder / "manifest.json").read_text())
    except ValidationError as exc:
        raise UsageError(f"{folder / 'manifest.json'} is not a backup manifest this version reads: {exc}") from exc


def restore(settings: Settings, location: Path, *, images: bool, retry: RetryPolicy) -> RestoreReport:
    """Write a backup into the settings' Milvus (and, with ``images``, their image store). The collection
    takes the settings' name; it is created with the backed-up model and index, or must hold that model."""
    started = time.perf_counter()
    folder = find_backup(location)
    manifest = read_manifest(folder)
    if images and not manifest.images:
        raise UsageError(f"{folder} holds no images (it was made without --images); restore without --images.")
    # Every file checked before anything is written (and read again when written: holding a whole backup
    # in memory to save one read would not scale).
    for entry in manifest.collections:
        for chunk in entry.chunks:
            _read_chunk(folder, chunk)
    store = open_image_store(settings) if images else None
    report = RestoreReport(path=str(folder), collections={})
    restored: set[str] = set()
    name = settings.milvus.collection
    for entry in manifest.collections:
        target = name if entry.role == "similarity" else copy_collection(name)
        own = settings.but(milvus={"index_type": entry.index.index_type, "index_params": entry.index.params})
        index = VectorIndex(own, entry.model, target)
        try:
            retry.call(index.ensure_ready)  # creates it, or refuses one that holds another model
            for chunk in entry.chunks:
                metadata, vectors = _read_chunk(folder, chunk)
                if store is not None:
                    for meta in metadata:
                        image_id = str(meta["id"])
                        if image_id not in restored:
                            _copy_in(store, folder, image_id, retry)
                            restored.add(image_id)
                records = [
                    VectorRecord(**meta, vector=v[0].tolist(), views=[view.tolist() for view in v[1:]])  # type: ignore[arg-type]
                    for meta, v in zip(metadata, vectors, strict=True)
                ]
                retry.call(index.upsert, records)
                report.collections[entry.role] = report.collections.get(entry.role, 0) + len(records)
            retry.call(index.flush)
        finally:
            index.close()
        logger.info("Restored %d images into '%s'", report.collections.get(entry.role, 0), target)
    report.images_restored = len(restored)
    report.duration_ms = round((time.perf_counter() - started) * 1000, 1)
    return report


def _copy_in(store: ImageStore, folder: Path, image_id: str, retry: RetryPolicy) -> None:
    # Originals before rows, as an add does: a restored row always has its original.
    for kind in KINDS:
        path = _image_path(folder, image_id, kind)
        if path.is_file() and not retry.call(store.exists, image_id, kind):
            retry.call(store.put, image_id, kind, path.read_bytes())


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retry-seconds", type=float, default=60.0, help="ride out an unavailable Milvus or store this long (default 60)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(argv: list[str] | None = None, prog: str = "python -m ingest.backup") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    make = commands.add_parser("backup", help="write a backup of the collection into a folder")
    make.add_argument("destination", type=Path, help="folder the backup is written into (as ris-backup-<time>/)")
    make.add_argument("--images", action="store_true", help="copy the originals and thumbnails too (a local store; for S3, mirror the bucket)")
    make.add_argument("--batch-size", type=int, default=500, help="images per file (default 500)")
    make.add_argument("--keep", type=int, default=0, help="then remove all but the newest KEEP backups in the folder (default 0: keep all)")
    _common(make)
    back = commands.add_parser("restore", help="write a backup into the settings' Milvus (and image store)")
    back.add_argument("backup", type=Path, help="a ris-backup-<time> folder, or a folder of them (the newest is used)")
    back.add_argument("--images", action="store_true", help="put the backed-up originals and thumbnails into the image store")
    _common(back)
    args = parser.parse_args(argv)
    return run_tool(args.command, lambda settings: _run(args, settings), on_failure="Nothing was lost; rerun the same command.")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    retry = RetryPolicy(deadline_s=max(0.0, args.retry_seconds))
    if args.command == "backup":
        if args.keep < 0:
            raise UsageError("--keep is a number of backups (0: keep all).")
        result: BackupReport | RestoreReport = backup(
            settings, args.destination, images=args.images, retry=retry, batch_size=max(1, args.batch_size)
        )
        if args.keep:
            for path in prune(args.destination, args.keep):
                logger.info("Removed the older backup %s", path)
    else:
        result = restore(settings, args.backup, images=args.images, retry=retry)
    return print_result(result.model_dump_json(indent=2) if args.json else result.summary())


def prune(destination: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete backups (and any partial one older than them)."""
    backups = sorted(p for p in destination.iterdir() if p.name.startswith(PREFIX))
    complete = [p for p in backups if not p.name.endswith(PARTIAL)]
    # A partial backup older than the newest complete one was interrupted (one still running is newer).
    abandoned = [p for p in backups if p.name.endswith(PARTIAL) and complete and p.name < complete[-1].name]
    doomed = complete[: max(0, len(complete) - keep)] + abandoned
    for path in doomed:
        shutil.rmtree(path)
    return doomed


if __name__ == "__main__":
    raise SystemExit(main())
