"""The product's own metrics (bento/core/metrics.py): route templates as labels, a bounded label set, the
embedder requests that wake a scaled-to-zero embedder; in-process, then on a real `bentoml serve`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from bento.core.ids import content_hash
from bento.core.metrics import (
    INTERNAL,
    LABELS,
    UNMATCHED,
    HttpMetrics,
    RouteTemplates,
    count_embedder_request,
    exposition,
)
from tests.support import metric_samples, metric_sum

SHA256 = re.compile(r"[0-9a-f]{64}")


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- in-process --------------------------------------------------------------------------------------


def _small_app() -> tuple[FastAPI, RouteTemplates]:
    """The shape of service.py's app: module routes, class routes included as a router, a catch-all."""
    app = FastAPI()
    router = APIRouter()

    @router.get("/api/images/{image_id}")
    async def image(image_id: str) -> dict[str, str]:
        return {"id": image_id}

    @router.post("/api/search")
    async def search() -> dict[str, str]:
        count_embedder_request()  # in a worker thread too: see below
        return {}

    @router.post("/api/embed")
    async def embed() -> dict[str, str]:
        await anyio.to_thread.run_sync(count_embedder_request)
        return {}

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("unhandled")

    @router.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    app.include_router(router)

    @app.api_route("/{unknown:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def no_such_route(unknown: str) -> JSONResponse:
        return JSONResponse({"error": "not_found"}, status_code=404)

    routes = RouteTemplates(app, unmatched=lambda route: getattr(route, "endpoint", None) is no_such_route)
    app.add_middleware(HttpMetrics, routes=routes, not_load=("/ready",))
    return app, routes


@pytest.fixture(scope="module")
def small_app() -> Iterator[tuple[TestClient, RouteTemplates]]:
    app, routes = _small_app()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, routes


def test_routes_are_labelled_by_template_and_unknown_paths_by_one_value(small_app) -> None:
    client, routes = small_app
    before = _value("ris_http_requests_total", route="/api/images/{image_id}", method="GET", status="200")
    other_before = _value("ris_http_requests_total", route=UNMATCHED, method="GET", status="404")
    for image_id in ("a" * 64, "b" * 64, "NOT-AN-ID"):
        assert client.get(f"/api/images/{image_id}").status_code == 200
    for garbage in ("/nothing", f"/x/{'c' * 64}", "/api/images/"):
        assert client.get(garbage).status_code == 404
    assert _value("ris_http_requests_total", route="/api/images/{image_id}", method="GET", status="200") == before + 3
    assert _value("ris_http_requests_total", route=UNMATCHED, method="GET", status="404") == other_before + 3
    # A known path with a method no route takes: its route template (405), not the path.
    assert client.request("PATCH", "/api/search").status_code == 405
    assert _value("ris_http_requests_total", route="/api/search", method="PATCH", status="405") >= 1
    assert routes.all() == sorted(["/api/images/{image_id}", "/api/search", "/api/embed", "/boom", "/ready",
                                   "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", UNMATCHED])
    text, _ = exposition()
    ours = [(name, labels) for name, labels, _ in metric_samples(text.decode()) if name.startswith("ris_")]
    assert ours, "no ris_ series in the exposition: nothing was checked"
    for name, labels in ours:
        assert not any(SHA256.search(v) or v.startswith("/x/") for v in labels.values()), (name, labels)


def test_failures_are_counted_with_their_status_and_probes_are_not_load(small_app) -> None:
    client, _ = small_app
    before = _value("ris_http_requests_total", route="/boom", method="GET", status="500")
    assert client.get("/boom").status_code == 500
    assert _value("ris_http_requests_total", route="/boom", method="GET", status="500") == before + 1
    assert _value("ris_http_request_duration_seconds_count", route="/boom", method="GET") >= 1
    # The gauge exists and went back to 0 after the crash.
    assert REGISTRY.get_sample_value("ris_http_requests_in_progress", {"route": "/boom", "method": "GET"}) == 0
    assert client.get("/ready").status_code == 200
    assert REGISTRY.get_sample_value("ris_http_requests_in_progress", {"route": "/ready", "method": "GET"}) is None
    assert _value("ris_http_requests_total", route="/ready", method="GET", status="200") >= 1


def test_embedder_requests_carry_the_route_into_worker_threads(small_app) -> None:
    client, _ = small_app
    search, embed, internal = (_value("ris_embedder_requests_total", route=r) for r in ("/api/search", "/api/embed", INTERNAL))
    assert client.post("/api/search").status_code == 200
    assert client.post("/api/embed").status_code == 200
    count_embedder_request()  # outside any request
    assert _value("ris_embedder_requests_total", route="/api/search") == search + 1
    assert _value("ris_embedder_requests_total", route="/api/embed") == embed + 1
    assert _value("ris_embedder_requests_total", route=INTERNAL) == internal + 1


class _DownEmbedder:
    """A dependency client whose service is unreachable (scaled to zero)."""

    class to_sync:  # noqa: N801 - BentoML's attribute name
        @staticmethod
        def describe() -> Any:
            raise ConnectionRefusedError("no endpoints")

        @staticmethod
        def embed(pixels: np.ndarray) -> Any:
            from http import HTTPStatus

            from bentoml.exceptions import BentoMLException

            raise BentoMLException("Service Unavailable", error_code=HTTPStatus.SERVICE_UNAVAILABLE)


def test_a_request_to_an_embedder_that_is_down_still_counts() -> None:
    """What wakes an embedder at zero is precisely the request that fails for want of one."""
    from bento.adapters.remote import RemoteEmbedder
    from bento.core.errors import BackendUnavailable

    before = _value("ris_embedder_requests_total", route=INTERNAL)
    remote = RemoteEmbedder(_DownEmbedder())
    with pytest.raises(BackendUnavailable):
        remote.embed(np.zeros((1, 224, 224, 3), dtype=np.uint8))
    with pytest.raises(BackendUnavailable):
        remote.describe()
    assert _value("ris_embedder_requests_total", route=INTERNAL) == before + 2


def test_the_service_apps_templates() -> None:
    """service.py's app: image ids fold into templates, a 405 keeps its route's; the catch-all's unknown paths are `other`."""
    import service

    def route(method: str, path: str) -> str:
        return service.app_routes({"type": "http", "method": method, "path": path, "root_path": "", "headers": [], "query_string": b""})

    image_id = "ab" * 32
    assert route("GET", f"/api/images/{image_id}") == "/api/images/{image_id}"
    assert route("DELETE", f"/api/images/{image_id}") == "/api/images/{image_id}"
    assert route("GET", f"/api/images/{image_id}/thumbnail") == "/api/images/{image_id}/thumbnail"
    assert route("GET", "/api/images/NOT-AN-ID/metadata") == "/api/images/{image_id}/metadata"
    assert route("GET", "/api/images") == route("POST", "/api/images") == "/api/images"
    assert route("POST", "/api/search") == "/api/search" and route("GET", "/metrics") == "/metrics"
    # A known path with another method (405) keeps its template; unknown paths are `other`.
    assert route("PUT", "/api/search") == "/api/search" and route("PATCH", f"/api/images/{image_id}") == "/api/images/{image_id}"
    assert route("GET", f"/api/images/{image_id}/x") == route("GET", "/etc/passwd") == UNMATCHED and route("BREW", "/") == "/"
    assert route("GET", "/static/app.js") == "/static/{path}"
    assert not [t for t in service.app_routes.all() if SHA256.search(t)]
    assert set(LABELS) == {
        "ris_http_requests_total", "ris_http_request_duration_seconds", "ris_http_requests_in_progress",
        "ris_embedder_requests_total", "ris_backend_up",
    }
    # BentoML's own request metrics are off for the API (raw paths); on for the embedder (its few routes).
    assert service.ImageSearch.config["metrics"] == {"enabled": False}
    assert "metrics" not in service.Embedder.config
    assert [cls for cls, _ in service.Embedder.middlewares] == [HttpMetrics]


# --- a real `bentoml serve` ------------------------------------------------------------------------------


@pytest.mark.slow
def test_served_metrics_use_route_templates_and_count_embedder_requests(live_service, photo_set) -> None:
    """GET /metrics of the running API, after reading images by id (two real ids and a made-up one):
    one series per route template, no id in any label, none of BentoML's per-path series of the API; the
    embedder counter moves on an upload search and not on the gallery."""
    with httpx.Client(base_url=live_service.url, timeout=60) as client:
        ids = [content_hash(photo_set["originals"][name]) for name in ("astronaut", "coffee")]
        missing = "0" * 64
        for image_id in ids:
            assert client.get(f"/api/images/{image_id}").status_code == 200
            assert client.get(f"/api/images/{image_id}/metadata").status_code == 200
        assert client.get(f"/api/images/{missing}").status_code == 404
        assert client.get(f"/api/images/{missing}/thumbnail").status_code == 404
        assert client.get(f"/no/such/{missing}").status_code == 404
        before = metric_samples(client.get("/metrics").text)
        assert client.get("/api/images").status_code in (200, 202)
        after_gallery = metric_samples(client.get("/metrics").text)
        query = photo_set["queries"]["coffee"]
        found = client.post("/api/search", files={"file": ("q.jpg", query, "image/jpeg")}, data={"top_k": "1"})
        assert found.status_code == 200, found.text
        scrape = client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    after = metric_samples(scrape.text)

    for name, labels, _ in after:
        assert not any(SHA256.search(value) for value in labels.values()), (name, labels)
    image_reads = [
        (labels["method"], labels["status"]) for name, labels, _ in after
        if name == "ris_http_requests_total" and labels["route"] == "/api/images/{image_id}"
    ]
    assert len(image_reads) == len(set(image_reads)) and {("GET", "200"), ("GET", "404")} <= set(image_reads)
    assert metric_sum(after, "ris_http_requests_total", route="/api/images/{image_id}", method="GET", status="200") >= 2
    assert metric_sum(after, "ris_http_requests_total", route="/api/images/{image_id}/metadata", method="GET", status="200") >= 2
    assert metric_sum(after, "ris_http_requests_total", route="/api/images/{image_id}/thumbnail", method="GET", status="404") >= 1
    assert metric_sum(after, "ris_http_requests_total", route=UNMATCHED, method="GET", status="404") >= 1
    assert metric_sum(after, "ris_http_request_duration_seconds_count", route="/api/search", method="POST") >= 1
    in_progress = {labels["route"] for name, labels, _ in after if name == "ris_http_requests_in_progress"}
    assert "/api/search" in in_progress and not in_progress & {"/ready", "/metrics"}

    # BentoML's request metrics are off for the API service: no raw paths, no image-search series at all.
    for name, labels, _ in after:
        if name.startswith("bentoml_service_request"):
            assert labels.get("runner_name") != "image-search", (name, labels)
            assert not labels.get("endpoint", "").startswith("/api/"), (name, labels)

    # The embedder counter: unchanged by the gallery, up by the upload search (describe may count too).
    routes = {labels["route"] for name, labels, _ in before if name == "ris_embedder_requests_total"}
    assert {"/api/search", "/api/images", "/api/search/url", "/api/embed", INTERNAL} <= routes, "started at 0"
    assert metric_sum(after_gallery, "ris_embedder_requests_total") == metric_sum(before, "ris_embedder_requests_total")
    assert metric_sum(after, "ris_embedder_requests_total", route="/api/search") >= metric_sum(before, "ris_embedder_requests_total", route="/api/search") + 1
    assert metric_sum(after, "ris_embedder_requests_total", route="/api/images") == metric_sum(before, "ris_embedder_requests_total", route="/api/images")


def test_gauges_of_dead_workers_are_forgotten(tmp_path, monkeypatch) -> None:
    """A worker killed mid-request leaves a live gauge above zero behind: the next start drops it (and keeps
    the gauges of processes that are alive, and every counter)."""
    import os
    import subprocess
    import sys

    from bento.core.metrics import forget_dead_processes

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    files = [f"gauge_livesum_{gone.pid}.db", f"gauge_liveall_{gone.pid}.db", f"gauge_livesum_{os.getpid()}.db",
             f"counter_{gone.pid}.db"]
    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_processes() == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"gauge_livesum_{os.getpid()}.db", f"counter_{gone.pid}.db"])
