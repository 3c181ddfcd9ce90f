"""Image store: originals and thumbnails keyed by content hash, never by client names."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from bento.core.config import Settings
from bento.core.errors import BackendUnavailable, ConnectionDropped, NotFound, SearchError
from bento.core.ids import validate_image_id
from bento.domain.ports import ImageStore, Kind
from bento.domain.schemas import StoreInfo

logger = logging.getLogger(__name__)



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

    def ping(self) -> None:
        if self.root.exists() and not os.access(self.root, os.W_OK):
            raise BackendUnavailable(f"Image store at {self.root} is not writable.")

    def info(self) -> StoreInfo:
        return StoreInfo(backend="local", location=str(self.root.resolve()))


class S3ImageStore:
    """MinIO/S3 through the minio SDK. The bucket is created if missing and never made public:
    clients get presigned GET URLs (signed locally, no network call) or the service streams bytes.

    ``public_endpoint`` (a URL such as ``https://images.example.com``) is where browsers reach the same
    server when ``endpoint`` is an in-cluster name: SigV4 signs the host, so URLs are signed for that
    host by a second client (same credentials and region) rather than rewritten after signing."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool,
        region: str,
        prefix: str = "",
        timeout_s: float = 5.0,
        presign_expiry_s: int = 3600,
        public_endpoint: str = "",
    ) -> None:
        import urllib3
        from minio import Minio

        # Short timeouts and no retries of its own: an unreachable store must become a quick 503, not a
        # hang, and retrying is the callers' one policy (bento/core/retry.py).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s), retries=False, maxsize=16
        )
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
        )
        self.signer = self.client
        if public_endpoint:
            public = urlsplit(public_endpoint)
            if public.scheme not in ("http", "https") or not region:
                raise ValueError(
                    f"A public S3 endpoint is a http(s) URL (got {public_endpoint!r}) and needs a region: "
                    "URLs for it are signed offline, the public host may be unreachable from here."
                )
            # Only signs (the region is set, so minio never asks the server for the bucket's location).
            self.signer = Minio(
                public.netloc, access_key=access_key, secret_key=secret_key,
                secure=public.scheme == "https", region=region, http_client=http,
            )
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.expiry = timedelta(seconds=presign_expiry_s)
        self._bucket_ready = False

    def _key(self, image_id: str, kind: Kind) -> str:
        validate_image_id(image_id)
        folder = "originals" if kind == "original" else "thumbnails"
        return f"{self.prefix}{folder}/{image_id[:2]}/{image_id}"

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Transport failures and server-side errors of S3 become BackendUnavailable (HTTP 503)."""
        import urllib3
        from minio.error import MinioException, S3Error

        try:
            yield
        except SearchError:
            raise
        except S3Error as exc:
            self._bucket_ready = False
            if exc.code == "NoSuchBucket":  # waiting does not create it: not an outage
                raise NotFound(f"S3 at {self.endpoint} has no bucket {exc.bucket_name!r}.") from exc
            if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BackendUnavailable(f"S3 at {self.endpoint} refused our credentials ({exc.code}).") from exc
            raise BackendUnavailable(f"S3 at {self.endpoint} answered {exc.code}: {exc.message}") from exc
        except (urllib3.exceptions.ProtocolError, ConnectionResetError) as exc:
            # A pooled keep-alive connection the server had closed: the request never ran.
            raise ConnectionDropped(f"S3 at {self.endpoint} dropped the connection: {exc.__class__.__name__}") from exc
        except (urllib3.exceptions.HTTPError, MinioException, OSError) as exc:
            self._bucket_ready = False
            raise BackendUnavailable(f"S3 at {self.endpoint} is unavailable: {exc.__class__.__name__}") from exc

    def ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._guard():
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
                logger.info("Created private bucket %s at %s", self.bucket, self.endpoint)
        self._bucket_ready = True

    def put(self, image_id: str, kind: Kind, data: bytes) -> None:
        key = self._key(image_id, kind)
        self.ensure_bucket()
        with self._guard():
            if self._size(key) == len(data):
                return
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def _size(self, key: str) -> int | None:
        from minio.error import S3Error

        try:
            return self.client.stat_object(self.bucket, key).size
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                return None
            raise

    def get(self, image_id: str, kind: Kind) -> bytes:
        from minio.error import InvalidResponseError, S3Error

        key = self._key(image_id, kind)
        with self._guard():
            try:
                response = self.client.get_object(self.bucket, key)
            except (S3Error, InvalidResponseError) as exc:
                # Some S3 servers send error bodies the SDK cannot parse; a HEAD tells missing from broken.
                if self._size(key) is None:
                    raise NotFound(f"No {kind} stored for image {image_id}.") from exc
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def exists(self, image_id: str, kind: Kind) -> bool:
        key = self._key(image_id, kind)
        self.ensure_bucket()
        with self._guard():
            return self._size(key) is not None

    def delete(self, image_id: str) -> None:
        with self._guard():
            for kind in ("original", "thumbnail"):
                self.client.remove_object(self.bucket, self._key(image_id, kind))

    # --- any object of the server (the ingest job reads its sources with these) ------------------------
    def objects(self, bucket: str, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix`` in ``bucket``, listed page by page (nothing read)."""
        with self._guard():
            # Asked first: some S3 servers answer a listing of a missing bucket with a body the SDK cannot
            # parse (an "outage" to wait out), while a HEAD says plainly that it is not there.
            if not self.client.bucket_exists(bucket):
                raise NotFound(f"S3 at {self.endpoint} has no bucket {bucket!r}.")
            for entry in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if entry.object_name is not None and not entry.is_dir:
                    yield entry.object_name, int(entry.size or 0)

    def read_object(self, bucket: str, key: str) -> bytes:
        """An object's bytes. One that is gone or may not be read is that file's problem (OSError: the
        ingest reports it and goes on), not an outage to wait out."""
        from minio.error import InvalidResponseError, S3Error

        unreadable = ""
        with self._guard():
            try:
                response = self.client.get_object(bucket, key)
            except (S3Error, InvalidResponseError) as exc:
                code = getattr(exc, "code", "")
                if code == "AccessDenied":
                    unreadable = "access denied"
                # Some S3 servers send error bodies the SDK cannot parse; a HEAD tells missing from broken.
                elif code in ("NoSuchKey", "NoSuchObject", "NotFound") or self._missing(bucket, key):
                    unreadable = "no such object"
                else:
                    raise
            else:
                try:
                    return response.read()
                finally:
                    response.close()
                    response.release_conn()
        raise OSError(f"cannot read s3://{bucket}/{key}: {unreadable}")  # outside the guard: not an outage

    def _missing(self, bucket: str, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(bucket, key)
        except S3Error as exc:
            return exc.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound")
        return False

    def presigned_url(self, image_id: str, kind: Kind) -> str | None:
        # Signing is local computation (the region is configured), so this works even while S3 is down.
        return self.signer.presigned_get_object(self.bucket, self._key(image_id, kind), expires=self.expiry)

    def ping(self) -> None:
        """A real round trip (readiness): the bucket exists, or is created now; else BackendUnavailable."""
        self._bucket_ready = False
        self.ensure_bucket()

    def info(self) -> StoreInfo:
        scheme = "https" if self.secure else "http"
        return StoreInfo(backend="s3", location=f"{scheme}://{self.endpoint}/{self.bucket}/{self.prefix}")


def open_image_store(settings: Settings) -> ImageStore:
    """The store the settings name. Builds a client object only; nothing is contacted yet."""
    if settings.store.backend == "s3":
        s3 = settings.s3
        return S3ImageStore(
            s3.endpoint,
            s3.bucket,
            s3.access_key.get_secret_value(),
            s3.secret_key.get_secret_value(),
            secure=s3.secure,
            region=s3.region,
            prefix=s3.prefix,
            timeout_s=s3.timeout_s,
            presign_expiry_s=s3.presign_expiry_s,
            public_endpoint=s3.public_endpoint,
        )
    return LocalImageStore(settings.image_store_dir)
