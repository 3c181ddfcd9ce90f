"""Load check of the HTTP API: concurrent searches, a search/insert mix and parallel 24-megapixel uploads
against a service of its own; prints one markdown table, asserts no timings.

``python bench/load_check.py [--clients 16] [--seconds 30] [--big-uploads 8] [--skip-big] [--json-out PATH]``
``python bench/load_check.py --quick``   (2 clients, 3 s, 2 uploads of a 2000x1500 PNG: the CI smoke run)

- The service: ``bentoml serve service:ImageSearch`` (scripts.devstack.BentoService through bench/serving.py's
  ``serve``) with the embedded defaults (a Milvus Lite file and a local image store in a temp dir) and
  ``RIS_MODEL_NAME=efficientnet-lite0`` (genuine weights, installs offline) unless the caller sets it; the
  caller's other RIS_* variables pass through. The model is imported into a temp ``BENTOML_HOME`` first
  (or the caller's). The real demo photos (ingest.demo.photos()) are inserted first, so searches have hits.
- A "search": N clients (httpx.AsyncClient) upload near-duplicate JPEGs of those photos to POST /api/search
  back to back for S seconds. B "mix": the same, but every fifth request is an insert (POST /api/images) of a
  new near-duplicate (new bytes, so a new image). C "big uploads": M parallel POST /api/search of one
  6000x4000 PNG (real photos tiled and upscaled, with camera-like grain: ~39 MB); the service is started with
  RIS_LIMITS_MAX_UPLOAD_BYTES raised to 150000000 (when lower) so that it fits, and the output says so.
- Per scenario: requests, count per HTTP status, requests/s and p50/p99 latency of the 200/201 answers, and the
  resident memory (RSS) of the API process before, at peak and after. Every request loop stops by itself:
  at the deadline or after --max-requests, each request bounded by the client timeout.
- The API process: ``bentoml serve`` is a supervisor whose children are one worker process per service and
  worker, each started as ``python -m _bentoml_impl.worker.service <target> --service-name <name> ...``. The
  API workers are those children (psutil) whose command line names ``--service-name image-search`` (the
  ``@bentoml.service`` name of ImageSearch; "embedder" and "vector-search" are the others). A thread sums
  their RSS every 50 ms (several workers with RIS_SERVICES_API_WORKERS > 1: the sum) and re-finds them every
  second, so a restarted worker is followed.
- Acceptable answers: 200/201, or 429/503 that carry a Retry-After header. Anything else (another status, a
  429/503 without Retry-After, a transport error or client timeout) is printed as an UNEXPECTED line and makes
  the script exit 1 at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import machine  # noqa: E402
from serving import base_env, pct, query_photos  # noqa: E402

from bento.core.config import settings_from  # noqa: E402
from ingest.demo import encode, near_duplicate, photos  # noqa: E402
from scripts.devstack import BentoService  # noqa: E402

API_SERVICE = "image-search"  # @bentoml.service(name=...) of ImageSearch in service.py
WORKER_MODULE = "_bentoml_impl.worker.service"  # how BentoML 1.4 starts each service worker
BIG_UPLOAD_LIMIT = 150_000_000
INSERT_EVERY = 5  # scenario B: one request in five is an insert
SAMPLE_S = 0.05
REQUEST_TIMEOUT_S = 120.0  # the API's own traffic timeout (service.py)
BIG_TIMEOUT_S = 300.0


# --- the API process and its memory ------------------------------------------------------------------
def service_name(cmdline: list[str]) -> str | None:
    """The BentoML service a process serves, from its command line; None if it is no service worker."""
    if not any(arg == WORKER_MODULE or arg.endswith(f"/{WORKER_MODULE.replace('.', '/')}.py") for arg in cmdline):
        return None
    if "--service-name" in cmdline[:-1]:
        return cmdline[cmdline.index("--service-name") + 1]
    return API_SERVICE  # a worker without the flag serves the target itself: service:ImageSearch


def api_workers(serve_pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(serve_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if service_name(child.cmdline()) == API_SERVICE:
                found.append(child)
        except psutil.Error:
            continue
    return found


class RssSampler:
    """Sums the RSS of the API worker(s) every 50 ms in a thread while the ``with`` block runs."""

    def __init__(self, serve_pid: int, interval_s: float = SAMPLE_S) -> None:
        self.serve_pid = serve_pid
        self.interval_s = interval_s
        self.workers: list[psutil.Process] = []
        self.found_at = 0.0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        """Current RSS of all API workers, bytes (0 if none is found)."""
        if not self.workers or time.monotonic() - self.found_at > 1.0:
            self.workers, self.found_at = api_workers(self.serve_pid), time.monotonic()
        total = 0
        for worker in self.workers:
            try:
                total += worker.memory_info().rss
            except psutil.Error:
                self.found_at = 0.0  # gone: look again next time
        return total

    def _run(self) -> None:
        while True:
            value = self.rss()
            self.samples += 1
            self.peak = max(self.peak, value)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.peak, self.samples = 0, 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


# --- requests -------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    kind: str  # "search" or "insert"
    status: int | None  # None: no HTTP answer (transport error, client timeout)
    ms: float
    retry_after: str | None = None
    detail: str = ""  # body start or exception, kept for unexpected outcomes
    hits: int | None = None  # hits of a 200 search

    @property
    def ok(self) -> bool:
        return self.status in (200, 201)

    @property
    def acceptable(self) -> bool:
        return self.ok or (self.status in (429, 503) and bool(self.retry_after))

    @property
    def label(self) -> str:
        if self.status is None:
            return self.detail.split(":", 1)[0]
        if self.status in (429, 503):
            return f"{self.status} ({'Retry-After' if self.retry_after else 'no Retry-After'})"
        return str(self.status)


Request = tuple[str, str, dict, dict]  # kind, path, files, form data
Planner = Callable[[int], Awaitable[Request]]


async def send(http: httpx.AsyncClient, request: Request) -> Outcome:
    kind, path, files, data = request
    started = time.perf_counter()
    try:
        response = await http.post(path, files=files, data=data)
    except httpx.HTTPError as exc:
        return Outcome(kind, None, (time.perf_counter() - started) * 1000, detail=f"{type(exc).__name__}: {exc}"[:300])
    ms = (time.perf_counter() - started) * 1000
    outcome = Outcome(kind, response.status_code, ms, response.headers.get("retry-after"))
    if kind == "search" and response.status_code == 200:
        try:
            outcome.hits = len(response.json()["hits"])
        except (ValueError, KeyError, TypeError):
            outcome.status, outcome.detail = None, "BadSearchBody: " + response.text[:200]
    elif not outcome.acceptable:
        outcome.detail = response.text[:300]
    return outcome


async def drive(url: str, clients: int, seconds: float, max_requests: int, plan: Planner, timeout_s: float) -> tuple[list[Outcome], float]:
    """``clients`` loops send ``plan(n)`` back to back until ``seconds`` pass or ``max_requests`` are sent;
    returns the outcomes and the wall time until the last answer."""
    outcomes: list[Outcome] = []
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and sent < max_requests:
            n, sent = sent, sent + 1
            outcomes.append(await send(http, await plan(n)))

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        started = time.perf_counter()
        deadline = started + seconds
        try:
            # A backstop only: every loop ends at the deadline and every request within timeout_s.
            await asyncio.wait_for(asyncio.gather(*(client(http, deadline) for _ in range(clients))), seconds + timeout_s + 30)
        except TimeoutError:
            outcomes.append(Outcome("scenario", None, 0.0, detail="ScenarioOverran: clients still busy past the deadline"))
        return outcomes, time.perf_counter() - started


# --- scenarios ------------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    clients: int
    seconds: float
    requests: int
    statuses: dict[str, int]
    ok_per_s: float
    p50_ms: float
    p99_ms: float
    with_hits: str = ""
    rss_before_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_after_mb: float | None = None
    api_workers: int | None = None
    unexpected: list[str] = field(default_factory=list)


def summarise(name: str, clients: int, outcomes: list[Outcome], elapsed: float) -> Row:
    ok = [o.ms for o in outcomes if o.ok]
    searches = [o for o in outcomes if o.kind == "search" and o.status == 200]
    statuses = Counter(o.label for o in outcomes)
    unexpected = []
    for (kind, label), count in sorted(Counter((o.kind, o.label) for o in outcomes if not o.acceptable).items()):
        first = next(o for o in outcomes if not o.acceptable and (o.kind, o.label) == (kind, label))
        unexpected.append(f"UNEXPECTED: {name}: {kind} answered {label} x{count} (first: {first.detail or '-'})")
    return Row(
        scenario=name, clients=clients, seconds=round(elapsed, 1), requests=len(outcomes),
        statuses=dict(sorted(statuses.items())), ok_per_s=len(ok) / elapsed if elapsed else 0.0,
        p50_ms=pct(ok, 50), p99_ms=pct(ok, 99),
        with_hits=f"{sum(1 for o in searches if o.hits)}/{len(searches)}" if searches else "",
        unexpected=unexpected,
    )


def measured(name: str, sampler: RssSampler, clients: int, run: Callable[[], tuple[list[Outcome], float]]) -> tuple[Row, list[Outcome]]:
    before = sampler.rss()
    with sampler:
        outcomes, elapsed = run()
    row = summarise(name, clients, outcomes, elapsed)
    row.rss_before_mb, row.rss_peak_mb, row.rss_after_mb = before / 2**20, sampler.peak / 2**20, sampler.rss() / 2**20
    row.api_workers = len(sampler.workers)
    return row, outcomes


def big_png(width: int, height: int, seed: int = 0) -> bytes:
    """Real photos tiled 4x3 and upscaled to ``width`` x ``height``, with +-2 levels of grain so that the PNG
    compresses like a camera photo (6000x4000: ~39 MB), not like a smooth upscale (~23 MB)."""
    images = [image for _, _, image in photos()]
    cols, rows = 4, 3
    tile_w, tile_h = width // cols, height // rows
    canvas = Image.new("RGB", (width, height))
    for i in range(cols * rows):
        image = images[i % len(images)]
        scale = max(tile_w / image.width, tile_h / image.height)
        size = (round(image.width * scale) + 1, round(image.height * scale) + 1)
        tile = image.resize(size, Image.Resampling.BICUBIC).crop((0, 0, tile_w, tile_h))
        canvas.paste(tile, ((i % cols) * tile_w, (i // cols) * tile_h))
    pixels = np.asarray(canvas, dtype=np.int16)
    pixels += np.random.default_rng(seed).integers(-2, 3, size=pixels.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: no successful request


def format_statuses(statuses: dict[str, int]) -> str:
    """``{"200": 41, "503": 2}`` as a table cell: ``200: 41, 503: 2`` (``-`` when empty)."""
    return ", ".join(f"{label}: {count}" for label, count in statuses.items()) or "-"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| scenario | clients | seconds | requests | statuses | requests/s (200/201) | p50 ms | p99 ms | searches with hits "
        "| API RSS before MB | API RSS peak MB | API RSS after MB |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        statuses = format_statuses(r.statuses)
        lines.append(
            f"| {r.scenario} | {r.clients} | {r.seconds:.1f} | {r.requests} | {statuses} | {r.ok_per_s:.1f} | {fmt(r.p50_ms)} "
            f"| {fmt(r.p99_ms)} | {r.with_hits} | {fmt(r.rss_before_mb)} | {fmt(r.rss_peak_mb)} | {fmt(r.rss_after_mb)} |"
        )
    return lines


def import_model(work: Path) -> None:
    """The model into the BentoML model store first (a one-time step, as in bench/serving.py)."""
    done = subprocess.run([sys.executable, "-m", "models", "import"], cwd=ROOT, env=base_env(work / "import"),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"python -m models import failed ({done.returncode}):\n{done.stderr[-3000:]}")


def ingest_photos(url: str) -> tuple[int, list[str]]:
    """Insert the real demo photos with their labels; returns (images inserted or present, unexpected lines)."""
    statuses: Counter[str] = Counter()
    unexpected = []
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        for label, name, image in photos():
            response = http.post("/api/images", files={"file": (f"{name}.jpg", encode(image))}, data={"label": label})
            statuses[str(response.status_code)] += 1
            if response.status_code not in (200, 201):
                unexpected.append(f"UNEXPECTED: ingest: insert of {name} answered {response.status_code} ({response.text[:200]})")
    print(f"collection: {sum(statuses[s] for s in ('200', '201'))} real photos inserted first "
          f"({', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))})")
    return statuses["200"] + statuses["201"], unexpected


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients in A and B (default 16)")
    parser.add_argument("--seconds", type=float, default=None, help="duration of A and of B (default 30)")
    parser.add_argument("--big-uploads", type=int, default=None, help="parallel uploads of one big PNG in C (default 8)")
    parser.add_argument("--skip-big", action="store_true", help="no scenario C")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap on the requests of one scenario")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny run (2 clients, 3 s, 2 uploads of a 2000x1500 PNG)")
    parser.add_argument("--workdir", type=Path, default=None, help="model store, data and service.log (default: a temp dir)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they come, also into a pipe
    clients = args.clients or (2 if args.quick else 16)
    seconds = args.seconds or (3.0 if args.quick else 30.0)
    big_uploads = args.big_uploads or (2 if args.quick else 8)
    big_size = (2000, 1500) if args.quick else (6000, 4000)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ris-load-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BENTOML_HOME", str(work / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("RIS_MODEL_NAME", "efficientnet-lite0")
    # The per-client limit of inserts would turn most of B's inserts from this one client into 429s: the
    # load check measures the service, so it is off unless the caller sets it (429 + Retry-After counts
    # as acceptable either way).
    os.environ.setdefault("RIS_LIMITS_EXPENSIVE_PER_MINUTE", "0")
    log = work / "service.log"
    env = base_env(work / "data")
    limits = settings_from(env).limits  # the caller's limits (and a clear stop on an unknown RIS_* variable)

    print(f"# Load check: {clients} clients x {seconds:g} s (search, then search + insert mix), "
          + ("no big uploads" if args.skip_big else f"then {big_uploads} parallel {big_size[0]}x{big_size[1]} PNG uploads") + "\n")
    print(f"Machine: {machine()}\n")
    big = b""
    if not args.skip_big:
        big = big_png(*big_size)
        raised = []
        if limits.max_upload_bytes < max(BIG_UPLOAD_LIMIT, len(big)):
            env["RIS_LIMITS_MAX_UPLOAD_BYTES"] = str(max(BIG_UPLOAD_LIMIT, len(big)))
            raised.append(f"RIS_LIMITS_MAX_UPLOAD_BYTES={env['RIS_LIMITS_MAX_UPLOAD_BYTES']} (was {limits.max_upload_bytes})")
        if limits.max_image_pixels < big_size[0] * big_size[1]:
            env["RIS_LIMITS_MAX_IMAGE_PIXELS"] = str(big_size[0] * big_size[1])
            raised.append(f"RIS_LIMITS_MAX_IMAGE_PIXELS={env['RIS_LIMITS_MAX_IMAGE_PIXELS']} (was {limits.max_image_pixels})")
        print(f"big upload: {big_size[0]}x{big_size[1]} PNG, {len(big) / 1e6:.1f} MB; the service runs with "
              + (", ".join(raised) if raised else "the caller's limits") + " so that it fits (A and B send 3-75 KB JPEGs)")

    import_model(work)
    uploads = query_photos()
    base_images = [image for _, _, image in photos()]
    nonce = secrets.randbelow(10**6) * 10**6  # new bytes for every insert, in every run

    async def search_plan(n: int) -> Request:
        return "search", "/api/search", {"file": ("q.jpg", uploads[n % len(uploads)])}, {}

    async def mix_plan(n: int) -> Request:
        if n % INSERT_EVERY != INSERT_EVERY - 1:
            return await search_plan(n)
        data = await asyncio.to_thread(near_duplicate, base_images[n % len(base_images)], nonce + n)
        return "insert", "/api/images", {"file": (f"new-{n}.jpg", data)}, {"label": "load-check"}

    async def big_plan(n: int) -> Request:
        return "search", "/api/search", {"file": ("big.png", big, "image/png")}, {}

    rows: list[Row] = []
    unexpected: list[str] = []
    # bench/serving.py's serve() without its context manager: the sampler needs the serve process's pid.
    # A SIGTERM (a test's timeout, a CI cancel) unwinds through the finally below: the service, in a session of
    # its own, must not outlive this script.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    service = BentoService(env, log)
    try:
        # A worker that fails at start is restarted by BentoML's supervisor, so /readyz would just never come.
        cold = service.start(timeout_s=120 if args.quick else 600)
        url = service.url
        assert service.process is not None
        status = httpx.get(f"{url}/api/status", timeout=10).json()
        model, store = status.get("model", {}), status.get("store", {})
        print(f"service: bentoml serve service:ImageSearch, ready in {cold:.1f} s; model {model.get('model_id')} "
              f"({model.get('runtime')} {model.get('precision')}, {status.get('device')}); Milvus {status.get('milvus_backend')}, "
              f"store {store.get('backend', store)}; data and log under {work}")
        sampler = RssSampler(service.process.pid)
        workers = api_workers(sampler.serve_pid)
        print(f"API process: {len(workers)} worker(s) of service {API_SERVICE!r} (pid {', '.join(str(w.pid) for w in workers)}): "
              f"children of the `bentoml serve` process (pid {sampler.serve_pid}) whose command line is "
              f"`python -m {WORKER_MODULE} ... --service-name {API_SERVICE}`; RSS summed, sampled every {SAMPLE_S * 1000:.0f} ms")
        if not workers:
            unexpected.append(f"UNEXPECTED: no API worker found among the children of pid {sampler.serve_pid}")
        _, lines = ingest_photos(url)
        unexpected += lines
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:  # warm-up, not counted
            for data in uploads[:4]:
                http.post("/api/search", files={"file": ("q.jpg", data)})

        def scenario(plan: Planner, count: int, duration: float, timeout_s: float, parallel: int):
            return lambda: asyncio.run(drive(url, parallel, duration, count, plan, timeout_s))

        row, _ = measured("A search", sampler, clients, scenario(search_plan, args.max_requests, seconds, REQUEST_TIMEOUT_S, clients))
        rows.append(row)
        row, outcomes = measured("B mix (1 in 5 inserts)", sampler, clients, scenario(mix_plan, args.max_requests, seconds, REQUEST_TIMEOUT_S, clients))
        rows.append(row)
        for kind, name in (("search", "B: its searches"), ("insert", "B: its inserts")):
            part = summarise(name, clients, [o for o in outcomes if o.kind == kind], row.seconds)
            part.unexpected = []  # already counted in the B row
            rows.append(part)
        if not args.skip_big:
            rows.append(measured(f"C big uploads ({len(big) / 1e6:.0f} MB PNG)", sampler, big_uploads,
                                 scenario(big_plan, big_uploads, BIG_TIMEOUT_S, BIG_TIMEOUT_S, big_uploads))[0])
    finally:
        service.stop()

    print()
    print("\n".join(table(rows)))
    print("\nrequests/s and latency count the 200/201 answers; statuses count every request (a name instead of a code:"
          " no HTTP answer). API RSS: the image-search worker(s) only (decoding runs there), not the embedder or Milvus.")
    print("Acceptable: 200/201, or 429/503 with a Retry-After header.\n")
    unexpected += [line for row in rows for line in row.unexpected]
    for line in unexpected:
        print(line)
    verdict = "FAIL" if unexpected else "PASS"
    print(f"{verdict}" + (f" ({len(unexpected)} kinds of unexpected answers)" if unexpected else ""))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            "machine": machine(), "clients": clients, "seconds": seconds, "big_uploads": 0 if args.skip_big else big_uploads,
            "big_png": {"width": big_size[0], "height": big_size[1], "bytes": len(big)} if big else None,
            "service_env": {k: v for k, v in env.items() if k.startswith("RIS_")},
            "rows": [asdict(row) for row in rows], "unexpected": unexpected, "pass": not unexpected,
        }, indent=2, default=str))
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
