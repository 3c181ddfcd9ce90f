"""The product's own Prometheus metrics: HTTP requests by route template, and requests to the embedder.

Why not only BentoML's: BentoML 1.4.40 (``RunnerTrafficMetricsMiddleware``, the outermost middleware of
every service) labels ``bentoml_service_request_*`` with the raw request path, so every image id read
through the API (``/api/images/<sha256>``...) and every path a client makes up is a series of its own,
in the pod's memory and in Prometheus. Its only switch is all or nothing (the service's
``metrics.enabled``, which also removes BentoML's ``/metrics`` route): the API service turns it off and
records these instead, labelled by the template of the route that takes the request
(``/api/images/{image_id}``; ``other`` for any path no route takes), on its own ``/metrics``.

- ``ris_http_requests_total{route, method, status}``, ``ris_http_request_duration_seconds{route, method}``
  (histogram) and ``ris_http_requests_in_progress{route, method}``: the API, and the embedder service
  (its API routes, BentoML's probes, ``other``). Probes and scrapes are not load: they are left out of
  the in-progress gauge, so the autoscalers read it as it is.
- ``ris_backend_up{backend}``: 1 or 0, what the API pod's last check of Milvus (``milvus``) and of the image
  store (``store``) found; set by every readiness probe. Their outages show here, in /api/status and in the
  alerts, not by taking every API pod out of its Service (k8s/README.md, "Probes").
- ``ris_embedder_requests_total{route}``: requests sent (or tried) to the embedder service, by the API
  route that needed them (``internal``: on no request of ours, e.g. the vector-search service learning
  the model to open its index). Counted before the call, so a request that finds the embedder scaled to
  zero (and answers 503) counts: it is what wakes the embedder (k8s/overlays/keda).

Label names avoid the Prometheus Operator's target labels (``endpoint``, ``service``, ``pod``...), so they
are stored as they are written here.

Multiprocess: BentoML starts every service process (and each API worker) with ``PROMETHEUS_MULTIPROC_DIR``
in its environment; prometheus_client then keeps the values in files there and any worker's ``/metrics``
reads them all (also BentoML's own series of the other services of the pod). BentoML 1.4.40 deprecates
``bentoml.metrics`` in favour of prometheus_client itself. The metrics are made on first use, not at
import: the ``bentoml serve`` parent process and the tests import service.py too.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.routing import BaseRoute, Match, Mount

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The one label value of every path no route takes (and of every method outside METHODS): whatever a
# client sends, the label set stays bounded.
UNMATCHED = "other"
# The route of an embedder request made outside an HTTP request of ours.
INTERNAL = "internal"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Up to the services' traffic timeout (120 s): searches are ~0.1 s, batches and cold starts take seconds.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# The label names of each metric as exposed (tests/test_k8s.py checks the PromQL of the manifests against them).
LABELS: dict[str, tuple[str, ...]] = {
    "ris_http_requests_total": ("route", "method", "status"),
    "ris_http_request_duration_seconds": ("route", "method"),
    "ris_http_requests_in_progress": ("route", "method"),
    "ris_embedder_requests_total": ("route",),
    "ris_backend_up": ("backend",),
}

_current_route: ContextVar[str] = ContextVar("ris_current_route", default=INTERNAL)


@dataclass(frozen=True)
class _Metrics:
    requests: Any
    duration: Any
    in_progress: Any
    embedder_requests: Any
    backend_up: Any


def forget_dead_processes() -> list[int]:
    """Drop the live-gauge files of processes that are gone; the pids dropped.

    A worker killed mid-request (out of memory, a crash) leaves its in-progress gauge file behind with a
    value above zero, and multiprocess "livesum" adds it forever: the autoscalers would see load that is
    not there (an embedder that never scales to zero). prometheus_client asks for mark_process_dead on
    each dead worker; nothing in BentoML calls it, so every process does it for its predecessors at start."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []
    from prometheus_client import multiprocess

    dead = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            dead.add(int(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


@functools.cache
def _metrics() -> _Metrics:
    """The metric objects, made once per process on first use (prometheus_client reads
    PROMETHEUS_MULTIPROC_DIR when it is imported; the workers have it from their start)."""
    from prometheus_client import Counter, Gauge, Histogram

    forget_dead_processes()

    return _Metrics(
        requests=Counter(
            "ris_http_requests", "HTTP requests answered, by route template, method and status.",
            LABELS["ris_http_requests_total"],
        ),
        duration=Histogram(
            "ris_http_request_duration_seconds", "Time to answer an HTTP request, by route template and method.",
            LABELS["ris_http_request_duration_seconds"], buckets=DURATION_BUCKETS,
        ),
        in_progress=Gauge(
            "ris_http_requests_in_progress", "HTTP requests being answered now (probes and scrapes left out).",
            LABELS["ris_http_requests_in_progress"], multiprocess_mode="livesum",
        ),
        embedder_requests=Counter(
            "ris_embedder_requests", "Requests sent or tried to the embedder service, by the API route that needed them.",
            LABELS["ris_embedder_requests_total"],
        ),
        # "livemin": with several API workers, down when any live worker last saw it down.
        backend_up=Gauge(
            "ris_backend_up", "Whether a shared backend (milvus, store) answered the API's last check (1) or not (0).",
            LABELS["ris_backend_up"], multiprocess_mode="livemin",
        ),
    )


def record_backend(backend: str, up: bool) -> None:
    """What the API's last check of a shared backend found (the readiness probe checks every few seconds)."""
    _metrics().backend_up.labels(backend).set(1 if up else 0)


def count_embedder_request() -> None:
    """Called just before each call to the embedder service (whether or not it then answers)."""
    _metrics().embedder_requests.labels(_current_route.get()).inc()


def start_embedder_requests(routes: Iterable[str]) -> None:
    """Expose the counter at 0 for these routes from the start: Prometheus takes a series' first sample
    as its baseline, so without it the first request after a start would not show in rate()."""
    for route in routes:
        _metrics().embedder_requests.labels(route)


class HttpMetrics:
    """ASGI middleware: counts and times each HTTP request under the template of the route that takes it
    (``routes(scope)``); sets that route for ``count_embedder_request`` while the request runs."""

    def __init__(self, app: ASGIApp, routes: Callable[[Scope], str], not_load: Iterable[str] = ()) -> None:
        self.app = app
        self.routes = routes
        self.not_load = frozenset(not_load)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = _metrics()
        route = self.routes(scope)
        method = scope["method"] if scope["method"] in METHODS else UNMATCHED
        status = 500  # what an exception (or a cancelled request) that sent no answer is counted as

        async def send_recording_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_progress = None if route in self.not_load else metrics.in_progress.labels(route, method)
        token = _current_route.set(route)
        started = time.perf_counter()
        if in_progress is not None:
            in_progress.inc()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            if in_progress is not None:
                in_progress.dec()
            _current_route.reset(token)
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.duration.labels(route, method).observe(time.perf_counter() - started)


def leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Routes in the order a router tries them, included routers expanded (BentoML includes the service
    class's FastAPI routes as a router, without a prefix; FastAPI >= 0.16x keeps it as one route)."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router
            yield from leaf_routes(route.original_router.routes)
        elif not isinstance(route, Mount) and hasattr(route, "routes"):
            yield from leaf_routes(route.routes)
        else:
            yield route


class RouteTemplates:
    """The template of the route of ``app`` that takes a request: the first full match in the router's
    order, else the first partial one (a known path, another method: 405), else ``other``. Routes for
    which ``unmatched(route)`` holds (a catch-all answering 404) are ``other`` too."""

    def __init__(self, app: Any, unmatched: Callable[[BaseRoute], bool] = lambda _: False) -> None:
        self.app = app
        self.unmatched = unmatched

    def __call__(self, scope: Scope) -> str:
        partial: BaseRoute | None = None
        for route in leaf_routes(self.app.router.routes):
            match, _ = route.matches(scope)
            if match is Match.FULL and not self.unmatched(route):  # a catch-all takes what nothing else does
                return self.template(route)
            if match is Match.PARTIAL and partial is None:
                partial = route
        return UNMATCHED if partial is None else self.template(partial)

    def template(self, route: BaseRoute) -> str:
        if self.unmatched(route):
            return UNMATCHED
        if isinstance(route, Mount):
            return f"{route.path}/{{path}}"
        return getattr(route, "path", UNMATCHED)

    def all(self) -> list[str]:
        """Every template a request can be labelled with."""
        return sorted({self.template(route) for route in leaf_routes(self.app.router.routes)} | {UNMATCHED})


def fixed_routes(paths: Iterable[str]) -> Callable[[Scope], str]:
    """For an app whose routes are plain paths (a BentoML service's APIs and its probes): the path itself
    when it is one of them, else ``other``."""
    known = frozenset(paths)

    def route(scope: Scope) -> str:
        return scope["path"] if scope["path"] in known else UNMATCHED

    return route


class _HistogramsInOrder:
    """prometheus_client's MultiProcessCollector writes a histogram's _sum before its buckets and _count;
    the exposition format has each series' buckets first (as BentoML's own /metrics puts them)."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Any]:
        order = {"_bucket": 0, "_count": 1, "_sum": 2}
        for metric in self.collector.collect():
            if metric.type == "histogram":
                metric.samples.sort(key=lambda s: (
                    sorted((k, v) for k, v in s.labels.items() if k != "le"),
                    next((rank for suffix, rank in order.items() if s.name.endswith(suffix)), 3),
                    float(s.labels.get("le", 0)),
                ))
            yield metric


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every process of this service (multiprocess mode), and its content type."""
    import prometheus_client
    from prometheus_client import multiprocess

    _metrics()  # this process's metrics exist even before its first request
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        registry.register(_HistogramsInOrder(multiprocess.MultiProcessCollector(None)))
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
