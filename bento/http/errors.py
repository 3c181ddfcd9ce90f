"""Errors at the HTTP edge: the one table from domain errors (bento/core/errors.py) to HTTP statuses, and the
one builder of the JSON error body ``{error, detail}`` every answer uses (domain, routing, validation, 413)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bento.core.errors import (
    BackendUnavailable,
    Conflict,
    Forbidden,
    HttpError,
    ImageTooLarge,
    InvalidImage,
    InvalidParameters,
    InvalidRequest,
    MethodNotAllowed,
    ModelMismatch,
    ModelUnavailable,
    NotFound,
    RateLimited,
    RequestTooLarge,
    SearchError,
    Unauthenticated,
    UnsupportedImageFormat,
    UnsupportedMediaType,
    UrlFetchFailed,
)
from bento.domain.schemas import (
    ErrorResponse,
    FieldError,
)

logger = logging.getLogger("ris.service")


# The one table from domain errors to HTTP statuses (the most specific class wins).
HTTP_STATUS: dict[type[SearchError], int] = {
    InvalidRequest: 400,
    InvalidParameters: 422,
    MethodNotAllowed: 405,
    RequestTooLarge: 413,
    UrlFetchFailed: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    ModelMismatch: 409,
    ImageTooLarge: 413,
    UnsupportedImageFormat: 415,
    UnsupportedMediaType: 415,
    InvalidImage: 422,
    RateLimited: 429,
    SearchError: 500,
    ModelUnavailable: 503,
    BackendUnavailable: 503,
}


# What a client told "503, try later" should wait (a dropped dependency, a busy decoder, an outage).
RETRY_AFTER_S = 5


def http_status(error: SearchError) -> int:
    return next(HTTP_STATUS[cls] for cls in type(error).__mro__ if cls in HTTP_STATUS)


# What a caller without the admin scope reads of a server-side failure (the full message is logged).
PUBLIC_DETAIL: dict[int, str] = {
    500: "The service failed to answer this request; its operators can read why in its logs.",
    503: "A backend of the service (the model, the vector database or the image store) is unavailable; try again shortly.",
}


def error_body(error: SearchError, reveal: bool = True, status: int | None = None) -> tuple[int, ErrorResponse, dict[str, str]]:
    """The one builder of an error answer: its status (HTTP_STATUS unless given), the ``{error, detail}``
    body and its headers. ``reveal``: whether the caller may read a server-side failure's own message
    (operators may; to others it would name hosts, paths and causes)."""
    status = status or http_status(error)
    headers: dict[str, str] = {}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(error.retry_after_s)
    elif status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="reverse-image-search"'
    detail = error.message if reveal or error.public or status < 500 else PUBLIC_DETAIL.get(status, PUBLIC_DETAIL[500])
    fields = [FieldError(location=where, field=name, message=what) for where, name, what in getattr(error, "fields", [])]
    return status, ErrorResponse(error=error.code, detail=detail, errors=fields or None), headers


def error_response(error: SearchError, reveal: bool = True, status: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """``error_body`` as a JSON response (``headers``: more headers, e.g. a 405's Allow)."""
    status, body, own = error_body(error, reveal, status)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status, headers={**own, **(headers or {})})


def install_error_handlers(app: FastAPI) -> None:
    """Every error in the API's JSON shape ``{error, detail}``: domain errors by HTTP_STATUS, routing and
    validation errors by FastAPI's."""
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(SearchError, _domain_error)  # type: ignore[arg-type]


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the API's own error shape."""
    detail = str(exc.detail)
    error = {404: NotFound(detail), 405: MethodNotAllowed(detail)}.get(exc.status_code) or HttpError(detail, public=True)
    return error_response(error, status=exc.status_code, headers=dict(exc.headers or {}))


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [(str(e["loc"][0]), ".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]), e["msg"]) for e in exc.errors()]
    problems = "; ".join(f"{where}.{name}: {message}" for where, name, message in fields)
    return error_response(InvalidParameters(problems, fields=fields))


async def _domain_error(request: Request, exc: SearchError) -> JSONResponse:
    principal = getattr(request.state, "principal", None)
    response = error_response(exc, reveal=principal is not None and "admin" in principal.scopes)
    if response.status_code >= 500:
        logger.error("%s: %s", exc.code, exc.message)
    return response
