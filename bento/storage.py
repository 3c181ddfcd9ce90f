"""Image store: originals and thumbnails keyed by content hash, never by client names."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Literal, Protocol

from bento.errors import BackendUnavailable, InvalidRequest, NotFound
from bento.schemas import StoreInfo

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[0-9a-f]{64}$")
Kind = Literal["original", "thumbnail"]


def validate_image_id(image_id: str) -> str:
    if not _ID_RE.fullmatch(image_id):
        raise InvalidRequest("An image id is a 64-character lowercase sha256 hex digest.")
    return image_id


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

    def info(self) -> StoreInfo: ...


class LocalImageStore:
    """A directory tree: <root>/<kind>/<id[:2]>/<id>. Writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, image_id: str, kind: Kind) -> Path:
        validate_image_id(image_id)
        folder = "originals" if kind == "original" else "thumbnails"
        return self.root / folder / image_id[:2] / image_id

    def put(self, image_id: str, kind: Kind, data: bytes) -> None:
        path = self._path(image_id, kind)
        if path.exists() and path.stat().st_size == len(data):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise BackendUnavailable(f"Image store at {self.root} cannot be written: {exc}") from exc

    def get(self, image_id: str, kind: Kind) -> bytes:
        path = self._path(image_id, kind)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"No {kind} stored for image {image_id}.") from exc
        except OSError as exc:
            raise BackendUnavailable(f"Image store at {self.root} cannot be read: {exc}") from exc

    def exists(self, image_id: str, kind: Kind) -> bool:
        return self._path(image_id, kind).is_file()

    def delete(self, image_id: str) -> None:
        for kind in ("original", "thumbnail"):
            self._path(image_id, kind).unlink(missing_ok=True)

    def presigned_url(self, image_id: str, kind: Kind) -> str | None:
        return None

    def info(self) -> StoreInfo:
        return StoreInfo(backend="local", location=str(self.root.resolve()))


def open_image_store(store_dir: Path) -> ImageStore:
    return LocalImageStore(store_dir)
