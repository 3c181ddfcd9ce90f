"""Where an ingest reads its images: a local folder, or a bucket prefix of S3/MinIO (``s3://bucket/prefix``).

Both are ImageNet-style: the first path segment under the root (a folder, or the key under the prefix)
is the label; files right in the root get none; hidden names (a segment starting with ".") are skipped.
A source lists names and sizes without reading any content, so each shard of a parallel ingest reads
only its own files (``shard_of`` works on the name).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from bento.adapters.storage import S3ImageStore
from bento.core.config import Settings
from bento.core.errors import InvalidRequest, SearchError

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class SourceFile:
    name: str  # the path under the root, with "/" separators: what reports show
    label: str
    size: int


class ImageSource(Protocol):
    location: str  # what the report names: a folder's absolute path, or s3://bucket/prefix

    def files(self) -> Iterator[SourceFile]:
        """Every file, in a stable order, without reading any content."""

    def read(self, file: SourceFile) -> bytes:
        """The file's bytes (OSError for a file that cannot be read; BackendUnavailable for an outage)."""


def shard_of(name: str, shard_count: int) -> int:
    """The shard a file belongs to, by its name: stable across runs and pods, known before any read."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") % shard_count


def _label_of(name: str) -> str:
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else ""


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


# Files that live beside photos in real folders and are not images: editors' sidecars (XMP, Apple's AAE,
# darktable/RawTherapee/DxO settings), camera thumbnails, notes, metadata exports, Windows' Thumbs.db and
# desktop.ini, shortcuts. The job counts them as "not images" instead of reporting each as rejected.
SIDECAR_SUFFIXES = frozenset({
    ".aae", ".csv", ".db", ".dop", ".html", ".ini", ".json", ".lnk", ".log", ".md", ".pdf", ".pp3", ".thm",
    ".txt", ".url", ".xml", ".xmp", ".yaml", ".yml",
})


def is_sidecar(name: str) -> bool:
    """Whether a file of a source is a known non-image (see SIDECAR_SUFFIXES); anything else is tried."""
    suffix = Path(name).suffix.lower()
    return suffix in SIDECAR_SUFFIXES or name.lower().endswith((".jpg.xmp", ".jpeg.xmp"))


class FolderSource:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SearchError(f"{self.root} is not a folder.")
        self.location = str(self.root)

    def files(self) -> Iterator[SourceFile]:
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            for file_name in sorted(filenames):
                path = here / file_name
                if file_name.startswith(".") or not path.is_file():
                    continue
                name = path.relative_to(self.root).as_posix()
                try:
                    size = path.stat().st_size
                except OSError:  # gone since the folder was listed: nothing to ingest
                    continue
                yield SourceFile(name, _label_of(name), size)

    def read(self, file: SourceFile) -> bytes:
        return (self.root / file.name).read_bytes()


class S3Source:
    """Objects under a prefix of a bucket, through the image store's S3 adapter (its credentials, timeouts
    and error mapping: an unreachable server is BackendUnavailable, which the job's retry policy rides out)."""

    def __init__(self, store: S3ImageStore, bucket: str, prefix: str) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"{S3_SCHEME}{bucket}/{self.prefix}"

    def files(self) -> Iterator[SourceFile]:
        for key, size in self.store.objects(self.bucket, self.prefix):
            name = key[len(self.prefix) :]
            if name and not key.endswith("/") and not _hidden(name):
                yield SourceFile(name, _label_of(name), size)

    def read(self, file: SourceFile) -> bytes:
        return self.store.read_object(self.bucket, self.prefix + file.name)


def parse_s3_location(location: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``."""
    parts = urlsplit(location)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise InvalidRequest(f"An S3 source is s3://BUCKET/PREFIX; got {location!r}.")
    return parts.netloc, parts.path.lstrip("/")


def open_source(location: str, settings: Settings) -> ImageSource:
    """A folder path, or ``s3://bucket/prefix`` read with the S3 settings (RIS_S3_ENDPOINT, RIS_S3_ACCESS_KEY,
    ...: the image store's server and credentials; the bucket may be another than the store's)."""
    if not location.startswith(S3_SCHEME):
        return FolderSource(Path(location))
    bucket, prefix = parse_s3_location(location)
    s3 = settings.s3
    if not s3.endpoint:
        raise InvalidRequest("Reading s3:// needs RIS_S3_ENDPOINT (and RIS_S3_ACCESS_KEY / RIS_S3_SECRET_KEY).")
    store = S3ImageStore(
        s3.endpoint, bucket, s3.access_key.get_secret_value(), s3.secret_key.get_secret_value(),
        secure=s3.secure, region=s3.region, timeout_s=s3.timeout_s,
    )
    return S3Source(store, bucket, prefix)
