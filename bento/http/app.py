"""The API's FastAPI app with the edge around it (guard, metrics, error handlers), its last routes (/metrics and
the catch-all), and the product's request metrics on the inner BentoML services."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastapi_swagger
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match

from bento.core.config import Settings
from bento.core.errors import MethodNotAllowed, NotFound
from bento.core.metrics import HttpMetrics, RouteTemplates, exposition, fixed_routes, leaf_routes
from bento.http.errors import error_response, install_error_handlers
from bento.http.guard import EdgeGuard


def add_last_routes(app: FastAPI) -> None:
    """/metrics and the catch-all route; called after every other route (the catch-all must be last)."""
    app.add_api_route("/metrics", _metrics_page, methods=["GET"], include_in_schema=False)

    async def no_such_route(request: Request, unknown: str) -> JSONResponse:
        """Last route: BentoML answers paths no route of ours takes with a plain-text 404; this keeps every
        answer in the API's JSON error shape (a known path with another method is a 405)."""
        known_path = any(
            not is_fallback(route) and route.matches(request.scope)[0] == Match.PARTIAL
            for route in leaf_routes(app.router.routes)
            if isinstance(route, APIRoute)
        )
        if known_path:
            return error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
        return error_response(NotFound(f"No route /{unknown}"))

    no_such_route.fallback = True  # type: ignore[attr-defined]
    app.add_api_route(
        "/{unknown:path}", no_such_route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        include_in_schema=False,
    )


def is_fallback(route: Any) -> bool:
    """The catch-all route (its requests are counted as unmatched, not as a route of theirs)."""
    return getattr(getattr(route, "endpoint", None), "fallback", False)


def _metrics_page() -> Response:
    """Prometheus text of every process of this service: the product's series (bento/core/metrics.py) and
    BentoML's of the other services here (vector-search; the embedder too inside one `bentoml serve`)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


# BentoML's own routes next to a service's APIs: probes and scrapes, not load.
BENTOML_PROBES = ("/livez", "/readyz", "/healthz", "/metrics")


def count_requests(service: Any) -> None:
    """The product's request metrics (bento/core/metrics.py) on an inner BentoML service (the embedder):
    its in-progress gauge is what its autoscalers read. BentoML's own metrics stay on there (its adaptive
    batch sizes; its paths are the service's few routes, reached only by the API pods)."""
    routes = fixed_routes([*(api.route for api in service.apis.values()), *BENTOML_PROBES])
    service.add_asgi_middleware(HttpMetrics, routes=routes, not_load=BENTOML_PROBES)


SWAGGER_UI_DIR = Path(fastapi_swagger.__file__).parent / "resources"


def _docs_page(static_dir: Path) -> Callable[[], FileResponse]:
    def docs() -> FileResponse:
        """The API docs: Swagger UI served from here (bento/static/docs.html and docs.js)."""
        return FileResponse(static_dir / "docs.html", media_type="text/html")

    return docs


def make_app(settings: Settings, static_dir: Path) -> tuple[FastAPI, RouteTemplates]:
    """The API's FastAPI app with the edge around it (guard, metrics, error handlers) and its route
    templates (the metrics' labels); service.py adds the routes."""
    app = FastAPI(
        title="Reverse image search",
        description="Upload a photo, get the most similar images. Errors are JSON: {error, detail}. "
        "Writes and admin actions need an API key (Authorization: Bearer KEY, or X-API-Key).",
        version="0.1.0",
        docs_url=None,  # FastAPI's page loads Swagger UI from a CDN with an inline script: the CSP blocks both
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.add_middleware(EdgeGuard, settings=settings)
    # Outermost of the app's middleware (it counts EdgeGuard's 413s too). BentoML's own request metrics are
    # off for this service (they label raw paths: a series per image id); these label route templates.
    routes = RouteTemplates(app, unmatched=is_fallback)
    app.add_middleware(HttpMetrics, routes=routes, not_load=("/ready", "/metrics"))
    # Swagger UI's files from its package (fastapi-swagger), before the page's own /static.
    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    app.add_api_route("/docs", _docs_page(static_dir), methods=["GET"], include_in_schema=False)
    install_error_handlers(app)
    return app, routes
