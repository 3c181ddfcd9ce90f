"""EdgeGuard, a pure ASGI middleware on every route: request bodies bounded while they stream (it sees the body
before FastAPI spools a multipart upload or reads a JSON body), security headers on every answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bento.core.config import Settings
from bento.core.errors import ImageTooLarge, RequestTooLarge, SearchError
from bento.http.errors import error_body
from models.pipeline import MAX_PIXELS_BYTES

JSON_BODY_LIMIT = 64 * 1024


MULTIPART_OVERHEAD = 64 * 1024


EMBED_BODY_LIMIT = MAX_PIXELS_BYTES + 4096  # the largest .npy /api/embed accepts


def body_limit(method: str, path: str, settings: Settings) -> tuple[int, SearchError]:
    """The most bytes a request to this route may send, and the error when it sends more (413)."""
    if method == "POST" and path in ("/api/search", "/api/images"):
        limit = settings.limits.max_upload_bytes + MULTIPART_OVERHEAD
        return limit, ImageTooLarge(f"The upload is over the {settings.limits.max_upload_bytes}-byte image limit.")
    limit = EMBED_BODY_LIMIT if method == "POST" and path == "/api/embed" else JSON_BODY_LIMIT
    return limit, RequestTooLarge(f"The request body is over this route's {limit}-byte limit.")


def security_headers(settings: Settings) -> list[tuple[bytes, bytes]]:
    """Headers on every answer: a CSP that allows only the page's own script and style (no inline code),
    images from here, blobs (local previews), https and the S3 host of presigned URLs; no framing."""
    image_sources = ["'self'", "data:", "blob:", "https:"]
    if settings.store.backend == "s3":
        public = settings.s3.public_endpoint or f"{'https' if settings.s3.secure else 'http'}://{settings.s3.endpoint}"
        image_sources.append(public)
    csp = (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src {' '.join(image_sources)}; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class _BodyTooLarge(Exception):
    pass


class EdgeGuard:
    """Refuses a request body over its route's limit (413) whether or not it declares a Content-Length,
    while it streams; adds the security headers to every answer."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.headers = security_headers(settings)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]], send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refusal = body_limit(scope["method"], scope["path"], self.settings)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(send, refusal)
            return
        received, exceeded, started = 0, False, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if exceeded:  # whatever the app made of the interrupted body, the answer is 413
                return
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await self._too_large(send, refusal)

    async def _too_large(self, send: Callable[[dict[str, Any]], Awaitable[None]], refusal: SearchError) -> None:
        status, body, _ = error_body(refusal)
        payload = body.model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close"), *self.headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
