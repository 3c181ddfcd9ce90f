"""The API's FastAPI app with the edge around it (guard, metrics, error handlers), its last routes (/metrics and
the catch-all), and the product's request metrics on the inner BentoML services."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastapi_swagger
from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match

from bento.core.config import Settings
from bento.core.errors import InvalidParameters, MethodNotAllowed, NotFound
from bento.core.metrics import HttpMetrics, RouteTemplates, exposition, fixed_routes, leaf_routes
from bento.domain.schemas import ErrorResponse
from bento.http.errors import error_response, install_error_handlers
from bento.http.guard import EdgeGuard


def add_last_routes(app: FastAPI) -> None:
    """/metrics and the catch-all route; called after every other route (the catch-all must be last)."""
    app.add_api_route("/metrics", _metrics_page, methods=["GET"], include_in_schema=False)

    async def no_such_route(request: Request, unknown: str) -> JSONResponse:
        """Last route: BentoML answers paths no route of ours takes with a plain-text 404; this keeps every
        answer in the API's JSON error shape (a known path with another method is a 405)."""
        allowed = sorted({
            method
            for route in leaf_routes(app.router.routes)
            if isinstance(route, APIRoute) and not is_fallback(route) and route.matches(request.scope)[0] == Match.PARTIAL
            for method in route.methods
        })
        if allowed:
            error = MethodNotAllowed(f"{request.method} is not allowed here; {', '.join(allowed)} are")
            return error_response(error, headers={"Allow": ", ".join(allowed)})
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
        generate_unique_id_function=_operation_id,
        dependencies=[Depends(refuse_unknown_query)],
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
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app, routes


def _operation_id(route: APIRoute) -> str:
    """The route's function name (`search_upload`), not FastAPI's path-and-method compound: the names a
    generated client's methods get."""
    return route.name


async def refuse_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is refused (422), not ignored: `top_k` in the query string
    of POST /api/search (a form field there) silently answered with the default."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema:
        return
    # `self`: the service instance of a BentoML class view (injected by BentoML, never sent by a client;
    # FastAPI's scope["route"] is the route as declared, where it still reads as a query parameter).
    accepted = _ACCEPTED.get(id(route))
    if accepted is None:  # once per route: its dependency tree does not change
        accepted = _ACCEPTED[id(route)] = frozenset(_query_names(route.dependant) - {"self"})
    unknown = sorted(set(request.query_params) - accepted)
    if unknown:
        takes = f"it takes {', '.join(sorted(accepted))}" if accepted else "it takes none"
        raise InvalidParameters(
            f"Unknown query parameter {', '.join(unknown)} for {request.method} {route.path}: {takes}.",
            fields=[("query", name, "not a parameter of this operation") for name in unknown],
        )


# The query parameters each route takes (by the route's id: routes live as long as the app).
_ACCEPTED: dict[int, frozenset[str]] = {}


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# Tags of the API's operations, by path (the docs group them; generated clients make a module of each).
TAGS = {
    "search": "Search by an uploaded image, a URL or a stored image.",
    "collection": "The images: add, read, list, delete; labels; duplicate groups.",
    "operations": "The service: status, models, the index, batch embedding (the ingest job's).",
}


def _tag(path: str) -> str:
    if path.startswith("/api/search"):
        return "search"
    if path.startswith(("/api/images", "/api/labels", "/api/duplicates")):
        return "collection"
    return "operations"


def _statuses(path: str, method: str, operation: dict[str, Any]) -> dict[int, str]:
    """The error statuses an operation can really answer, each with the one error body."""
    statuses = {401: "No API key, or one that is not valid.", 403: "The key does not allow this.", 503: "A backend is unavailable; retry after Retry-After."}
    if operation.get("parameters") or operation.get("requestBody"):
        statuses[422] = "A parameter or field is not valid, or unknown (which, and why: `detail`)."
    if method in ("post", "put", "patch"):
        statuses[400] = "The request cannot be served as asked (`detail` says why)."
        statuses[413] = "The body is over this route's limit."
    if "{image_id}" in path or path == "/api/model" or path == "/api/search/id":
        statuses[404] = "No such image (or no copy model)."
    if path in ("/api/search", "/api/images") and method == "post" or path == "/api/embed":
        statuses[415] = "Not an image format (or body type) the service takes."
    if path in ("/api/search/url", "/api/images") and method == "post":
        statuses[429] = "Over the per-client limit; retry after Retry-After."
    if path in ("/api/index", "/api/embed", "/api/images") and method == "post":
        statuses[409] = "Conflicts with the collection's model, or with an index rebuild under way."
    return statuses


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus what clients need: tags, and every error status an operation answers with
    the one error body (FastAPI documents a 422 body of its own that this service never sends)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            operation["tags"] = [_tag(path)]
            # A key is optional: requests without one get RIS_AUTH_ANONYMOUS_SCOPES (search by default).
            if operation.get("security") and {} not in operation["security"]:
                operation["security"].append({})
            responses = operation.setdefault("responses", {})
            for status, description in _statuses(path, method, operation).items():
                responses[str(status)] = {"description": description, "content": error}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # Uploads: OpenAPI 3.1 says a file by contentMediaType; generators read the 3.0 `format: binary`.
    for body in components.values():
        for field in body.get("properties", {}).values():
            if field.get("contentMediaType") == "application/octet-stream":
                field["format"] = "binary"
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))  # FieldError beside it, where the $ref points
    components["ErrorResponse"] = error_schema
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    schema["tags"] = [{"name": name, "description": text} for name, text in TAGS.items()]
    app.openapi_schema = schema
    return schema
