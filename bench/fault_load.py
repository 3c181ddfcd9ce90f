"""Faults under load: kill and restart each dependency while an ingest, searches and uploads run, then check
that nothing acknowledged was lost and everything agrees; prints one markdown table.

``python bench/fault_load.py [--images 2000] [--clients 6] [--faults milvus,s3,embedder,api,store-full] [--json-out P]``
``python bench/fault_load.py --quick``   (the CI run: 120 images a phase, short phases, no copy model)

The stack is the one the tests use, real servers on loopback: a Milvus 2.3 standalone server
(scripts.devstack.MilvusServer), an S3 server (`rclone serve s3`) whose data folder is a small tmpfs of its
own (so that "the volume is full" is a real ENOSPC; skipped with the reason when tmpfs cannot be mounted),
and `bentoml serve service:ImageSearch` pointed at both. One phase per fault, each in the same way:

1. an ingest job starts on a fresh folder of distinct images (`python -m ingest --service-url`: it embeds
   through the API, as the cluster's ingest Job does, and rides out outages with --retry-seconds);
2. clients run searches (uploads of near-duplicates) and inserts of new images back to back; a client that
   gets a 429/503 waits what Retry-After says (at most MAX_WAIT_S) and tries again, a refused connection
   0.5 s, within a budget of RETRY_BUDGET_S: a request that never succeeds within it is "lost";
3. after a few seconds the fault: `milvus` kill -9 of the Milvus server and a restart on the same data
   (the real restart: same ports, its etcd and WAL replayed); `s3` the S3 server stopped for a while and
   started again; `embedder` / `api` kill -9 of that BentoML worker process (the supervisor starts a new
   one); `store-full` the image store's volume filled to the last byte for a while, then freed;
4. the clients go on until the service has answered /ready and a search for RECOVERED_FOR_S, then stop;
   the ingest job must end by itself.

Then, with everything quiet, the invariants: every acknowledged insert (201/200) is present with its
original, its thumbnail and its vector (a search by its id finds it first); no Milvus row lacks its
original (originals without a row, left by a write cut between the two, are counted and must answer 404:
unreachable); the ingest job, rerun, finds every image of its folder present; the gallery's total, the
label counts and the duplicate report count what Milvus counts; /ready answers 200 (no hand restart).

Measured per fault: the error window (first to last answer that was not 2xx), every status seen, 503/429s
without Retry-After and 500s (both must be 0), the time from the fault to /ready and a search answering
again, requests retried and lost. The script exits 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
import pymilvus  # noqa: F401 (imported first: its import sets its loggers up, quieted below)

# pymilvus logs every refused connection with its traceback while a restarted server comes up.
for _name in [n for n in logging.root.manager.loggerDict if n.startswith("pymilvus")] + ["pymilvus"]:
    logging.getLogger(_name).setLevel(logging.CRITICAL)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load_check import format_statuses, service_name  # noqa: E402
from run import machine  # noqa: E402
from serving import query_photos  # noqa: E402

from ingest.demo import GENERATED, encode  # noqa: E402
from scripts.devstack import BentoService, MilvusServer, S3Server, stack_env  # noqa: E402

FAULTS = ("milvus", "s3", "embedder", "api", "store-full")
RETRY_BUDGET_S = 90.0  # how long a client keeps trying one request (longer than any recovery here)
MAX_WAIT_S = 2.0  # the longest a client waits between tries, whatever Retry-After says
REQUEST_TIMEOUT_S = 60.0
RECOVERED_FOR_S = 3.0
LISTING_WAIT_S = 150.0  # the listing refreshes every minute (bento/domain/listing.py), plus its scan  # load keeps running this long after /ready and a search answer again
STORE_SIZE_MB = 256


# --- images ---------------------------------------------------------------------------------------
def image_bytes(seed: int) -> bytes:
    """A distinct small JPEG (one of the demo's generated kinds, drawn with its own seed)."""
    makers = list(GENERATED.values())
    rng = random.Random(seed)
    return encode(makers[seed % len(makers)](rng), "JPEG")


def write_folder(folder: Path, first_seed: int, count: int) -> set[str]:
    """``count`` distinct images in label folders; returns their ids (sha256 of the bytes)."""
    ids = set()
    labels = list(GENERATED)
    for i in range(count):
        data = image_bytes(first_seed + i)
        label = folder / labels[(first_seed + i) % len(labels)]
        label.mkdir(parents=True, exist_ok=True)
        (label / f"{first_seed + i:07d}.jpg").write_bytes(data)
        ids.add(hashlib.sha256(data).hexdigest())
    return ids


# --- the load -------------------------------------------------------------------------------------
@dataclass
class Attempt:
    at: float
    op: str
    status: int | None  # None: no answer (refused, reset, timed out)
    retry_after: bool


@dataclass
class Done:
    op: str
    ok: bool
    attempts: int
    image_id: str | None = None


@dataclass
class LoadResult:
    attempts: list[Attempt] = field(default_factory=list)
    requests: list[Done] = field(default_factory=list)


class Load:
    """Clients in a thread of their own (an event loop), so the fault can be injected from this one."""

    def __init__(self, url: str, clients: int, queries: list[bytes], first_seed: int) -> None:
        self.url, self.clients, self.queries = url, clients, queries
        self.seed = first_seed
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=RETRY_BUDGET_S + REQUEST_TIMEOUT_S + 30)
        return self.result

    def _next_seed(self) -> int:
        self.seed += 1
        return self.seed

    async def _one(self, http: httpx.AsyncClient, op: str) -> Done:
        """One logical request, tried until it succeeds or the retry budget is spent."""
        if op == "insert":
            data, name = image_bytes(self._next_seed()), "new.jpg"
        else:
            data, name = random.choice(self.queries), "query.jpg"
        path = "/api/images" if op == "insert" else "/api/search"
        started, attempts = time.monotonic(), 0
        while True:
            attempts += 1
            status, retry_after, wait, image_id = None, False, 0.5, None
            try:
                answer = await http.post(path, files={"file": (name, data)}, data={"top_k": "5"} if op == "search" else {})
                status = answer.status_code
                retry_after = "retry-after" in answer.headers
                if retry_after:
                    wait = min(float(answer.headers["retry-after"]), MAX_WAIT_S)
                if op == "insert" and status in (200, 201):
                    image_id = answer.json()["id"]
            except httpx.TransportError:
                pass
            self.result.attempts.append(Attempt(time.monotonic(), op, status, retry_after))
            if status is not None and 200 <= status < 300:
                return Done(op, True, attempts, image_id)
            if status is not None and status not in (429, 503):
                return Done(op, False, attempts)  # not something to retry: a bug (the table shows it)
            if time.monotonic() - started + wait > RETRY_BUDGET_S:
                return Done(op, False, attempts)
            await asyncio.sleep(wait)

    async def _client(self, http: httpx.AsyncClient, index: int) -> None:
        op = "insert" if index % 3 == 2 else "search"  # a third of the clients write
        while not self._stop.is_set():
            self.result.requests.append(await self._one(http, op))

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.clients)))


# --- the stack and its faults ---------------------------------------------------------------------
class Stack:
    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.store_dir = work / "s3-volume"
        self.store_dir.mkdir(parents=True)
        self.tmpfs = _mount_tmpfs(self.store_dir, STORE_SIZE_MB)
        # Milvus' default session lease (30 s): a restarted Milvus waits for its killed predecessor's
        # sessions to expire before it serves, as it would in a cluster.
        self.milvus = MilvusServer(work / "milvus" / "data")
        self.s3 = S3Server(self.store_dir / "data")
        self.milvus.start()
        self.s3.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
        env.update(stack_env(self.milvus, self.s3), BENTOML_DO_NOT_TRACK="true", RIS_DATA_DIR=str(work / "data"))
        env.setdefault("BENTOML_HOME", str(work / "bentoml"))
        env["RIS_MODEL_NAME"] = "efficientnet-lite0"
        if quick:
            env["RIS_MODEL_COPY_NAME"] = "none"
        self.env = env
        _run([sys.executable, "-m", "models", "import"], env)
        self.service = BentoService(env, work / "service.log")
        self.service.start(timeout_s=600)

    @property
    def url(self) -> str:
        return self.service.url

    def close(self) -> None:
        for server in (self.service, self.s3, self.milvus):
            server.stop()
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.store_dir)], check=False, capture_output=True)

    def worker(self, name: str) -> psutil.Process:
        assert self.service.process is not None
        for child in psutil.Process(self.service.process.pid).children(recursive=True):
            try:
                if service_name(child.cmdline()) == name:
                    return child
            except psutil.Error:
                continue
        raise RuntimeError(f"no worker serving {name}")

    def inject(self, fault: str, hold_s: float) -> str:
        """Cause ``fault`` and undo it (a restart, freed space); returns what was done, for the table."""
        if fault == "milvus":
            self.milvus.stop(kill=True)
            time.sleep(hold_s)
            self.milvus.start(timeout_s=180)
            return "kill -9, restart on the same data"
        if fault == "s3":
            self.s3.stop()
            time.sleep(hold_s)
            self.s3.start()
            return f"stopped {hold_s:.0f} s, started again"
        if fault in ("embedder", "api"):
            process = self.worker("embedder" if fault == "embedder" else "image-search")
            process.kill()
            return f"kill -9 of pid {process.pid} (the supervisor starts another)"
        if fault == "store-full":
            filler = self.store_dir / "filler"
            _fill(filler)
            time.sleep(hold_s)
            filler.unlink()
            return f"volume full for {hold_s:.0f} s, then freed"
        raise ValueError(fault)


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True)
    return done.returncode == 0


def _fill(path: Path) -> None:
    """Write until the volume is full (ENOSPC), to the last block."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096):
            block = b"\0" * size
            try:
                while True:
                    os.write(descriptor, block)
            except OSError:
                pass  # ENOSPC: the next, smaller blocks fill what is left
    finally:
        os.close(descriptor)


def _run(command: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def ready_and_searching(url: str, query: bytes) -> bool:
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            if http.get("/ready").status_code != 200:
                return False
            return http.post("/api/search", files={"file": ("q.jpg", query)}).status_code == 200
    except httpx.HTTPError:
        return False


# --- the checks -----------------------------------------------------------------------------------
def milvus_ids(stack: Stack) -> set[str]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=stack.milvus.uri, timeout=30)
    try:
        iterator = client.query_iterator("images", batch_size=4096, filter="view == 0", output_fields=["id"], consistency_level="Strong")
        ids: set[str] = set()
        while batch := iterator.next():
            ids |= {row["id"] for row in batch}
        iterator.close()
        return ids
    finally:
        client.close()


def stored_originals(stack: Stack) -> set[str]:
    from minio import Minio

    client = Minio(stack.s3.endpoint, stack.s3.access_key, stack.s3.secret_key, secure=False, region="us-east-1")
    return {obj.object_name.rsplit("/", 1)[-1] for obj in client.list_objects("images", prefix="originals/", recursive=True)}


def wait_ready_state(http: httpx.Client, path: str, **params: object) -> dict:
    for _ in range(600):
        answer = http.get(path, params=params)
        if answer.status_code == 200:
            return answer.json()
        time.sleep(0.2)
    raise RuntimeError(f"{path} never became ready")


@dataclass
class PhaseResult:
    fault: str
    injected: str = ""
    error_window_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    without_retry_after: int = 0
    server_errors: int = 0  # answers that are neither 2xx nor 429/503: 500s above all
    recovered_s: float | None = None
    requests: int = 0
    retried_ok: int = 0
    lost: int = 0
    acknowledged: int = 0
    acknowledged_missing: int = 0
    rows_without_original: int = 0
    orphan_originals: int = 0
    orphans_reachable: int = 0
    ingest_exact: bool = False
    listing_agrees: bool = False
    listing_lag_s: float = 0.0
    ready_after: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def check(stack: Stack, phase: PhaseResult, acknowledged: set[str], folder: Path, folder_ids: set[str]) -> None:
    rows, originals = milvus_ids(stack), stored_originals(stack)
    phase.acknowledged = len(acknowledged)
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        missing = []
        for image_id in sorted(acknowledged):
            found = http.post("/api/search/id", json={"id": image_id, "top_k": 1, "mode": "similar"})
            ok = (
                image_id in rows and image_id in originals
                and http.get(f"/api/images/{image_id}").status_code == 200
                and http.get(f"/api/images/{image_id}/thumbnail").status_code == 200
                and found.status_code == 200 and found.json()["hits"][:1] and found.json()["hits"][0]["id"] == image_id
            )
            if not ok:
                missing.append(image_id)
        phase.acknowledged_missing = len(missing)
        phase.rows_without_original = len(rows - originals)
        orphans = sorted(originals - rows)
        phase.orphan_originals = len(orphans)
        phase.orphans_reachable = sum(http.get(f"/api/images/{o}").status_code != 404 for o in orphans[:50])
        # The ingest job, rerun: every image of its folder present, none written twice.
        rerun = json.loads(_run([sys.executable, "-m", "ingest", str(folder), "--service-url", stack.url, "--no-progress", "--json",
                                 "--retry-seconds", "60"], stack.env).stdout)
        rows = milvus_ids(stack)
        phase.ingest_exact = folder_ids <= rows and rerun["ingested"] == 0 and rerun["image_count"] == len(rows)
        # The gallery's listing takes writes made through this service at once and the ingest job's (it
        # writes to Milvus itself) at its next refresh, within a minute: wait for it, and say how long.
        started, counts = time.monotonic(), {}
        while time.monotonic() - started < LISTING_WAIT_S:
            counts = {
                "gallery": wait_ready_state(http, "/api/images", limit=1)["total"],
                "labels": wait_ready_state(http, "/api/labels")["image_count"],
                "status": http.get("/api/status").json()["image_count"],
            }
            if set(counts.values()) == {len(rows)}:
                break
            time.sleep(2)
        phase.listing_lag_s = round(time.monotonic() - started, 1)
        http.get("/api/duplicates", params={"limit": 1, "refresh": "true"})  # a fresh scan, then its pages
        counts["duplicates"] = wait_ready_state(http, "/api/duplicates", limit=1)["report"]["image_count"]
        phase.listing_agrees = set(counts.values()) == {len(rows)}
        if not phase.listing_agrees:
            phase.problems.append(f"counts disagree with Milvus' {len(rows)}: {counts}")
        phase.ready_after = http.get("/ready").status_code == 200
    if phase.acknowledged_missing:
        phase.problems.append(f"{phase.acknowledged_missing} acknowledged inserts missing, e.g. {missing[:2]}")
    for name, bad in (("rows without their original", phase.rows_without_original),
                      ("orphan originals reachable", phase.orphans_reachable),
                      ("unexpected answers (500, or a 4xx but 429)", phase.server_errors),
                      ("429/503 answers without Retry-After", phase.without_retry_after),
                      ("requests lost (never succeeded within the retry budget)", phase.lost)):
        if bad:
            phase.problems.append(f"{bad} {name}")
    for name, good in (("the ingest rerun did not find every image present", phase.ingest_exact),
                       ("/ready does not answer 200", phase.ready_after),
                       ("never recovered", phase.recovered_s is not None)):
        if not good:
            phase.problems.append(name)


def run_phase(stack: Stack, fault: str, index: int, args: argparse.Namespace, queries: list[bytes]) -> PhaseResult:
    phase = PhaseResult(fault)
    if fault == "store-full" and not stack.tmpfs:
        phase.injected = "skipped: tmpfs cannot be mounted here (needs root or CAP_SYS_ADMIN)"
        phase.recovered_s, phase.ingest_exact, phase.listing_agrees, phase.ready_after = 0.0, True, True, True
        return phase
    folder = stack.work / f"ingest-{fault}"
    folder_ids = write_folder(folder, 1_000_000 * (index + 1), args.images)
    ingest = subprocess.Popen(
        [sys.executable, "-m", "ingest", str(folder), "--service-url", stack.url, "--no-progress", "--json", "--retry-seconds", "180"],
        cwd=ROOT, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    load = Load(stack.url, args.clients, queries, first_seed=50_000_000 * (index + 1))
    load.start()
    time.sleep(args.warmup)
    started = time.monotonic()
    phase.injected = stack.inject(fault, args.hold)
    while time.monotonic() - started < 300:
        if ready_and_searching(stack.url, queries[0]):
            phase.recovered_s = round(time.monotonic() - started, 1)
            break
        time.sleep(0.25)
    time.sleep(RECOVERED_FOR_S)
    result = load.stop()
    out, err = ingest.communicate(timeout=1800)
    if ingest.returncode != 0:
        phase.problems.append(f"the ingest job exited {ingest.returncode}: {err[-400:]}")

    failed = [a for a in result.attempts if a.status is None or not 200 <= a.status < 300]
    if failed:
        phase.error_window_s = round(max(a.at for a in failed) - min(a.at for a in failed), 1)
    phase.statuses = dict(sorted(Counter(str(a.status or "no answer") for a in result.attempts).items()))
    phase.without_retry_after = sum(1 for a in result.attempts if a.status in (429, 503) and not a.retry_after)
    phase.server_errors = sum(1 for a in result.attempts if a.status is not None and a.status >= 500 and a.status != 503)
    phase.server_errors += sum(1 for a in result.attempts if a.status is not None and 400 <= a.status < 500 and a.status != 429)
    phase.requests = len(result.requests)
    phase.retried_ok = sum(1 for r in result.requests if r.ok and r.attempts > 1)
    phase.lost = sum(1 for r in result.requests if not r.ok)
    acknowledged = {r.image_id for r in result.requests if r.ok and r.image_id}
    try:
        check(stack, phase, acknowledged, folder, folder_ids)
    except (RuntimeError, httpx.HTTPError, KeyError, ValueError) as exc:
        phase.problems.append(f"the checks could not run: {exc!r}"[:300])
    return phase


def table(phases: list[PhaseResult]) -> list[str]:
    lines = [
        "| fault | what was done | error window s | statuses seen | unexpected / no Retry-After | back in s "
        "| requests (retried ok / lost) | acked writes (missing) | rows w/o original / orphans | ingest rerun | listing = Milvus | verdict |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- | --- | --- | --- | --- |",
    ]
    for p in phases:
        statuses = format_statuses(p.statuses)
        lines.append(
            f"| {p.fault} | {p.injected} | {p.error_window_s} | {statuses} | {p.server_errors} / {p.without_retry_after} "
            f"| {p.recovered_s if p.recovered_s is not None else 'never'} | {p.requests} ({p.retried_ok} / {p.lost}) "
            f"| {p.acknowledged} ({p.acknowledged_missing}) | {p.rows_without_original} / {p.orphan_originals} "
            f"| {'exact' if p.ingest_exact else 'NOT exact'} | {f'yes (after {p.listing_lag_s} s)' if p.listing_agrees else 'NO'} "
            f"| {'ok' if p.passed else 'FAILED: ' + '; '.join(p.problems)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="images of each phase's ingest job (default 2000; quick 120)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients, a third of them inserting (default 6; quick 3)")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, in order: {', '.join(FAULTS)}")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of load before the fault (default 10; quick 3)")
    parser.add_argument("--hold", type=float, default=None, help="seconds a server stays down or the volume full (default 10; quick 4)")
    parser.add_argument("--quick", action="store_true", help="the CI run: small and short, no copy model")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--workdir", type=Path, help="servers' data and logs (default: a temp dir, removed after)")
    args = parser.parse_args(argv)
    args.images = args.images or (120 if args.quick else 2000)
    args.clients = args.clients or (3 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (3.0 if args.quick else 10.0)
    args.hold = args.hold if args.hold is not None else (4.0 if args.quick else 10.0)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ris-faults-"))
    print(f"# Faults under load ({machine()})\n")
    print(f"{args.images} images ingested per phase through the API while {args.clients} clients search and insert "
          f"(retry budget {RETRY_BUDGET_S:.0f} s, Retry-After honoured up to {MAX_WAIT_S:.0f} s); work dir {work}\n", flush=True)
    stack = Stack(work, args.quick)
    phases: list[PhaseResult] = []
    try:
        queries = query_photos()
        for index, fault in enumerate(faults):
            phases.append(run_phase(stack, fault, index, args, queries))
            done = phases[-1]
            print(f"- {fault}: {'ok' if done.passed else 'FAILED: ' + '; '.join(done.problems)} (back in {done.recovered_s} s, "
                  f"statuses {done.statuses}, {done.lost} lost, {done.acknowledged} acknowledged)", flush=True)
    finally:
        stack.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table(phases)))
    if args.json_out:
        args.json_out.write_text(json.dumps([{**asdict(p), "passed": p.passed} for p in phases], indent=2))
    return 0 if all(p.passed for p in phases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
