"""Kubernetes manifests (k8s/): the public Ingress routes exactly the search and read paths, with Kubernetes'
path semantics, and those paths match service.py's routes and the scopes their handlers require (no admin
route, only the known write routes, no stale path).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.k8s_support import WORKLOADS, find, requires_kubectl, service_routes

pytestmark = requires_kubectl


# What the public Ingress routes: (path, pathType). Everything else is for the cluster and operators.
PUBLIC_PATHS = {
    ("/", "Exact"),  # the page
    ("/static/", "Prefix"),  # its script and CSS
    ("/api/search", "Prefix"),  # /api/search, /api/search/url, /api/search/id
    ("/api/images", "Prefix"),  # GET originals, thumbnails, metadata (POST/DELETE need the write scope)
    ("/api/status", "Exact"),
    ("/api/model", "Exact"),
    ("/docs", "Exact"),
    ("/openapi.json", "Exact"),
}
# Routes that answer without a key: the web page and the API docs (static HTML; the API they call checks keys).
PAGES = {"/", "/docs"}
# Never through the Ingress: admin routes, probes, metrics, BentoML's own schema routes.
PRIVATE_PATHS = ["/api/index", "/api/embed", "/metrics", "/ready", "/readyz", "/livez", "/healthz", "/schema.json", "/docs.json"]
# Write routes the public paths do reach (they check the write scope); a new one must be added here knowingly.
PUBLIC_WRITE_ROUTES = {("POST", "/api/images"), ("DELETE", "/api/images/{image_id}")}


def _routes(path: str, path_type: str, request: str) -> bool:
    """Whether an Ingress path of this type takes the request path (Kubernetes' documented semantics)."""
    if path_type == "Exact":
        return request == path
    if path_type == "Prefix":  # element-wise; a trailing slash of the rule is ignored
        base = path.rstrip("/")
        return base == "" or request == base or request.startswith(base + "/")
    raise AssertionError(f"pathType {path_type} for {path}: only Exact and Prefix have portable semantics")


def test_path_matching_follows_kubernetes_semantics() -> None:
    assert _routes("/api/images", "Prefix", "/api/images/abc/thumbnail")
    assert _routes("/api/images", "Prefix", "/api/images")
    assert not _routes("/api/images", "Prefix", "/api/imagesx")
    assert _routes("/static/", "Prefix", "/static") and _routes("/static/", "Prefix", "/static/app.js")
    assert not _routes("/", "Exact", "/api/index") and _routes("/", "Prefix", "/api/index")
    assert not _routes("/docs", "Exact", "/docs.json") and not _routes("/docs", "Exact", "/docs/")


def _ingress_paths(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for ingress in find(docs, "Ingress"):
        spec = ingress["spec"]
        assert "defaultBackend" not in spec, "a defaultBackend routes every path"
        annotations = ingress["metadata"].get("annotations", {})
        for key in annotations:
            assert not re.search(r"use-regex|rewrite-target|snippet|app-root", key), f"{key} changes what paths reach the API"
        for rule in spec["rules"]:
            assert "http" in rule, "a rule without paths"
            found += [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
    return found


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_public_ingress_exposes_only_search_and_read_paths(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    assert find(docs, "Ingress"), f"{overlay}: no Ingress"
    for ingress in find(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            paths = [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
            assert len(paths) == len(set(paths)) and set(paths) == PUBLIC_PATHS, f"{overlay} {rule.get('host')}: {paths}"
    paths = _ingress_paths(docs)
    assert paths, f"{overlay}: the Ingress routes no path (nothing was checked)"
    for private in PRIVATE_PATHS:
        for request in (private, private + "/", private + "/x", private + "/x/y"):
            reached = [p for p in paths if _routes(*p, request)]
            assert not reached, f"{overlay}: {request} is reachable through the Ingress ({reached})"


def test_public_paths_match_the_services_routes_and_scopes() -> None:
    routes, other = service_routes()
    assert {("POST", "/api/index"), ("POST", "/api/embed")} <= {(m, p) for m, p, _ in routes}
    paths = sorted(PUBLIC_PATHS)

    def sample(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "some-id", path)

    reachable = [(m, p, s) for m, p, s in routes if ":path}" not in p and any(_routes(*e, sample(p)) for e in paths)]
    for method, path, scopes in reachable:
        assert "admin" not in scopes, f"{method} {path} needs the admin scope and is reachable through the Ingress"
        assert scopes or path in PAGES, f"{method} {path} checks no scope and is public"
    writes = {(m, p) for m, p, s in reachable if "write" in s}
    assert writes == PUBLIC_WRITE_ROUTES, f"write routes behind the public Ingress changed: {writes}"
    # Every public path leads somewhere (no stale entries).
    for path, path_type in paths:
        targets = [sample(p) for _, p, _ in routes if ":path}" not in p] + sorted(other)
        assert any(_routes(path, path_type, t) for t in targets), f"{path} ({path_type}) reaches no route of service.py"
