"""The domain's exceptions. Each carries the HTTP status the API edge answers with."""

from __future__ import annotations


class SearchError(Exception):
    """Base of every error this product raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SearchError):
    status_code = 400
    code = "invalid_request"


class InvalidImage(SearchError):
    """The bytes are not a decodable image (not an image, truncated, corrupt)."""

    status_code = 422
    code = "invalid_image"


class UnsupportedImageFormat(InvalidImage):
    status_code = 415
    code = "unsupported_image_format"


class ImageTooLarge(SearchError):
    """Too many bytes, or too many pixels (a decompression bomb)."""

    status_code = 413
    code = "image_too_large"


class UrlFetchFailed(SearchError):
    status_code = 400
    code = "url_fetch_failed"


class NotFound(SearchError):
    status_code = 404
    code = "not_found"


class ModelMismatch(SearchError):
    """The collection holds embeddings of another model; mixing them would make search meaningless."""

    status_code = 409
    code = "model_mismatch"


class ModelUnavailable(SearchError):
    status_code = 503
    code = "model_unavailable"


class BackendUnavailable(SearchError):
    """Milvus, the image store or a dependent service cannot be reached right now."""

    status_code = 503
    code = "backend_unavailable"


class MilvusLiteLocked(BackendUnavailable):
    """The Milvus Lite file cannot be opened (usually: another process owns it). Not transient."""

    code = "milvus_lite_locked"
