"""The domain's exceptions. They know nothing of HTTP: the edge (service.py) maps them to statuses.

Every error has a stable ``code`` (what API clients see in ``{"error": code}``) and can cross a process
boundary as an :class:`ErrorPayload` and come out as the same class with the same message.
"""

from __future__ import annotations

import json

from pydantic import BaseModel


class ErrorPayload(BaseModel):
    """A domain error as data: what one service hands another (and what the HTTP API answers)."""

    code: str
    message: str

    def to_exception(self) -> SearchError:
        return error_class(self.code)(self.message)


class SearchError(Exception):
    """Base of every error this product raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str, *, public: bool = False) -> None:
        super().__init__(message)
        self.message = message
        # Whether anyone may read the message of a server-side failure: most name hosts, paths or
        # causes, which only operators (admin keys) and the logs see.
        self.public = public

    def to_payload(self) -> ErrorPayload:
        return ErrorPayload(code=self.code, message=self.message)


class InvalidRequest(SearchError):
    code = "invalid_request"


class InvalidImage(SearchError):
    """The bytes are not a decodable image (not an image, truncated, corrupt)."""

    code = "invalid_image"


class UnsupportedImageFormat(InvalidImage):
    code = "unsupported_image_format"


class UnsupportedMediaType(InvalidRequest):
    """A request body in a format the route does not take."""

    code = "unsupported_media_type"


class ImageTooLarge(SearchError):
    """Too many bytes, or too many pixels (a decompression bomb)."""

    code = "image_too_large"


class RequestTooLarge(SearchError):
    """A request body over its route's limit (an image upload over its limit is ImageTooLarge)."""

    code = "request_too_large"


class InvalidParameters(InvalidRequest):
    """A request whose parameters or body fail validation (which fields, and why, in the message; each one
    also in ``fields`` for clients that show the error beside the field)."""

    code = "validation_error"

    def __init__(self, message: str, *, fields: list[tuple[str, str, str]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or []  # (where: query/body/path/header, field, what is wrong)


class MethodNotAllowed(SearchError):
    """A known path asked with a method it does not take."""

    code = "method_not_allowed"


class HttpError(SearchError):
    """Another refusal of the HTTP layer (its status comes with it)."""

    code = "http_error"


class UrlFetchFailed(SearchError):
    code = "url_fetch_failed"


class Unauthenticated(SearchError):
    """No API key, or one that is not valid, for an action that needs one."""

    code = "unauthenticated"


class Forbidden(SearchError):
    """The key (or the lack of one) does not allow this action."""

    code = "forbidden"


class Conflict(SearchError):
    """The action cannot run now because of another one (e.g. an index rebuild already running)."""

    code = "conflict"


class RateLimited(SearchError):
    """Too many requests from one client for an expensive action."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(SearchError):
    code = "not_found"


class ModelMismatch(SearchError):
    """The collection holds embeddings of another model; mixing them would make search meaningless."""

    code = "model_mismatch"


class ModelUnavailable(SearchError):
    """The model or runtime asked for cannot be loaded here. Waiting does not help."""

    code = "model_unavailable"


class BackendUnavailable(SearchError):
    """Milvus, the image store or a dependent service cannot be reached right now.

    ``transient``: whether waiting and trying again can help (the retry policy, bento/core/retry.py)."""

    code = "backend_unavailable"
    transient = True


class ConnectionDropped(BackendUnavailable):
    """A connection to a dependency was closed under an in-flight call. Safe to retry at once: every
    call the product makes to a dependency is idempotent (reads, upserts by content id, deletes)."""

    code = "connection_dropped"


class MilvusLiteLocked(BackendUnavailable):
    """The Milvus Lite file cannot be opened (usually: another process owns it). Not transient."""

    code = "milvus_lite_locked"
    transient = False


def _subclasses(cls: type[SearchError]) -> list[type[SearchError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def error_class(code: str) -> type[SearchError]:
    """The class for an error code (unknown codes: the base class, so nothing is lost)."""
    for cls in _subclasses(SearchError):
        if cls.code == code:
            return cls
    return SearchError


def error_from_answer(where: str, status: int, body: str) -> SearchError:
    """The domain error an HTTP answer of this product's API carries (its ``{error, detail}`` body) for
    a caller of the API (the ingest job's embedding client, `ris search`): the same class, the service's
    message; a 5xx, or a body that is not the API's, is BackendUnavailable."""
    if status < 500:
        try:
            answer = json.loads(body)
            return error_class(answer["error"])(f"{where}: {answer['detail']}")
        except (ValueError, KeyError, TypeError):
            pass
    return BackendUnavailable(f"{where} answered HTTP {status}: {body[:300]}")
