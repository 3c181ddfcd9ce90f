"""Faults that must lose nothing: servers stopped under the ingest job and under the running service.

The S3 server of these tests is their own; Milvus is the session's server (two Milvus standalones
do not run side by side here), frozen only for the length of one test.

The S3 server is really stopped and started again. The Milvus server is frozen (SIGSTOP) and thawed
(SIGCONT): from our side that is the same outage (no answers, then answers again) and it exercises the
same timeouts, retries and reconnects. A real kill + restart of Milvus 2.3.5 standalone was tried here
first: after an unclean stop it waits for its stale etcd sessions to expire and did not serve again
within 3 minutes, which would test Milvus' recovery rather than ours.
"""

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bento.core.ids import content_hash
from scripts.devstack import S3Server, stack_env
from tests.support import PYTHON, ROOT, Backend, ServiceProcess, make_images, metric_samples, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def own_s3(tmp_path):
    server = S3Server(tmp_path / "s3" / "data")
    server.start()
    yield server
    server.stop()


def _wait_for(predicate, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_milvus_outage_during_ingest_then_rerun_loses_nothing(milvus_server, s3_server, efficientnet, tmp_path):
    folder = tmp_path / "many"
    make_images(folder, 240)
    expected = {content_hash(p.read_bytes()) for p in folder.rglob("*.jpg")}
    backend = Backend("server-s3", tmp_path / "data", stack_env(milvus_server, s3_server, bucket="fault-milvus", collection="fault_milvus"))
    args = ["-m", "ingest", str(folder), "--batch-size", "8", "--no-progress", "--retry-seconds", "3"]
    process = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=backend.process_env(RIS_MILVUS_TIMEOUT_S="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(backend.blob_ids()) >= 40 or process.poll() is not None, 180, "the ingest to get going")
    assert process.poll() is None, "the ingest finished before Milvus could be stopped"
    milvus_server.pause()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-2000:]
    assert "Milvus" in stderr and "rerun the same command" in stderr  # a clear message, a resumable state

    milvus_server.resume()
    rerun = run_cli([*args, "--json"], backend.process_env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)
    assert report["ingested"] + report["skipped_existing"] == 240
    assert backend.stored_ids() == expected, "exactly every image once, nothing duplicated or lost"
    assert backend.blob_ids() == expected


def test_short_milvus_outage_during_ingest_is_ridden_out_by_retries(milvus_server, s3_server, efficientnet, tmp_path):
    folder = tmp_path / "many"
    make_images(folder, 160)
    backend = Backend("server-s3", tmp_path / "data", stack_env(milvus_server, s3_server, bucket="fault-retry", collection="fault_retry"))
    args = [PYTHON, "-m", "ingest", str(folder), "--batch-size", "8", "--no-progress", "--retry-seconds", "120", "--json"]
    process = subprocess.Popen(args, cwd=ROOT, env=backend.process_env(RIS_MILVUS_TIMEOUT_S="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(backend.blob_ids()) >= 24 or process.poll() is not None, 180, "the ingest to get going")
    assert process.poll() is None
    milvus_server.pause()
    time.sleep(8)  # longer than one call's timeout: the job must retry, not just wait
    milvus_server.resume()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "Retrying" in stderr or "retrying" in stderr.lower()
    assert json.loads(stdout)["image_count"] == 160 == len(backend.stored_ids())


@contextlib.contextmanager
def _service_client(milvus, s3, name: str, tmp_path, **env: str) -> Iterator[httpx.Client]:
    """A running service over the given servers (own collection and bucket), and a client for it."""
    backend = Backend("server-s3", tmp_path / "data", stack_env(milvus, s3, bucket=f"fault-{name}", collection=f"fault_{name}"))
    service = ServiceProcess(backend.process_env(RIS_MODEL_NAME="efficientnet-lite0", **env), tmp_path / "service.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            yield client
    finally:
        service.stop()


def test_s3_outage_under_the_service(milvus_server, own_s3, efficientnet, photo_set, tmp_path):
    """Search by upload keeps working (it needs the embedder and Milvus only; result URLs are signed
    locally); image fetches and inserts say 503 until S3 is back, then recover by themselves. The pod stays
    ready (/ready: a shared backend's outage must not take every API pod out of the Service); the outage
    shows in /api/status and in ris_backend_up{backend="store"}."""
    with _service_client(milvus_server, own_s3, "s3", tmp_path, RIS_S3_TIMEOUT_S="2") as client:
        data = photo_set["originals"]["coffee"]
        image_id = client.post("/api/images", files={"file": ("coffee.jpg", data)}, data={"label": "coffee"}).json()["id"]

        own_s3.stop()
        search = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])})
        assert search.status_code == 200 and search.json()["hits"][0]["id"] == image_id
        fetch = client.get(f"/api/images/{image_id}")
        assert fetch.status_code == 503 and "S3" in fetch.json()["detail"]
        insert = client.post("/api/images", files={"file": ("rocket.jpg", photo_set["originals"]["rocket"])})
        assert insert.status_code == 503 and insert.json()["error"] == "backend_unavailable"
        assert client.get("/readyz").status_code == 503  # BentoML's: every dependency
        assert client.get("/ready").status_code == 200  # the pod's: it can serve
        assert _backend_up(client, "store") == 0 and _backend_up(client, "milvus") == 1
        status = client.get("/api/status").json()
        assert status["ready"] is False and "S3" in status["error"]

        own_s3.start()
        _wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness after S3 came back")
        assert client.get("/ready").status_code == 200 and _backend_up(client, "store") == 1
        assert client.get(f"/api/images/{image_id}").content == data
        assert client.post("/api/images", files={"file": ("rocket.jpg", photo_set["originals"]["rocket"])}).status_code == 201


def test_milvus_outage_under_the_service(milvus_server, s3_server, efficientnet, photo_set, keys, tmp_path):
    """A 503 at once (no hang), readiness down, recovery by itself; with keys configured, the outage's
    details (the Milvus address) are read by admin keys only."""
    from bento.http.auth import hash_key

    entries = f"reader:search:{hash_key(keys.search)}, ops:admin:{hash_key(keys.admin)}"
    with _service_client(milvus_server, s3_server, "m", tmp_path, RIS_MILVUS_TIMEOUT_S="3", RIS_AUTH_KEYS=entries) as client:
        admin = {"X-API-Key": keys.admin}
        data = photo_set["originals"]["rocket"]
        image_id = client.post("/api/images", files={"file": ("rocket.jpg", data)}, headers=admin).json()["id"]

        milvus_server.pause()
        started = time.monotonic()
        query = {"file": ("q.jpg", photo_set["queries"]["rocket"])}
        search = client.post("/api/search", files=query, headers={"X-API-Key": keys.search})
        assert search.status_code == 503 and search.json()["error"] == "backend_unavailable"
        assert time.monotonic() - started < 45, "an unreachable Milvus must give a 503, not a hang"
        assert milvus_server.uri.split("//")[-1] not in search.text and "try again" in search.json()["detail"]
        operator = client.post("/api/search", files=query, headers=admin)
        assert operator.status_code == 503 and milvus_server.uri.split("//")[-1] in operator.json()["detail"]
        assert client.get("/readyz").status_code == 503
        assert client.get("/ready").status_code == 200, "one Milvus outage must not take every API pod out"
        assert _backend_up(client, "milvus") == 0
        # What still answers meanwhile: the page, the API docs and schema, the status (ready=false); image
        # reads need their metadata (in Milvus) and answer 503 with Retry-After like searches.
        assert all(client.get(path).status_code == 200 for path in ("/", "/docs", "/openapi.json"))
        thumbnail = client.get(f"/api/images/{image_id}/thumbnail", headers=admin)
        assert thumbnail.status_code == 503 and thumbnail.headers["retry-after"]
        status = client.get("/api/status", headers=admin)
        assert status.status_code == 200 and status.json()["ready"] is False and "Milvus" in status.json()["error"]

        milvus_server.resume()
        _wait_for(lambda: client.get("/readyz").status_code == 200, 90, "readiness after Milvus came back")
        assert client.get("/ready").status_code == 200 and _backend_up(client, "milvus") == 1
        hits = client.post("/api/search", files=query).json()["hits"]
        assert hits[0]["id"] == image_id and client.get("/api/status").json()["image_count"] == 1


def _backend_up(client: httpx.Client, backend: str) -> float:
    """ris_backend_up for a backend, as the API's /metrics has it after a readiness check."""
    client.get("/ready")
    samples = metric_samples(client.get("/metrics").text)
    values = [value for name, labels, value in samples if name == "ris_backend_up" and labels.get("backend") == backend]
    assert values, f"no ris_backend_up for {backend}"
    return min(values)


class _AnsweringService(ServiceProcess):
    """A service that is up (its HTTP API answers /api/status) though not ready."""

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/status", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


def test_a_locked_lite_file_is_explained_to_the_http_client(efficientnet, photo_set, tmp_path):
    """The VectorSearch service's advice (another process holds the Milvus Lite file) crosses to the API
    service as a typed error and reaches the HTTP client whole, not as a generic 503."""
    from pymilvus import MilvusClient

    backend = Backend("lite-local", tmp_path / "data")
    path = backend.settings().milvus.uri
    Path(path).parent.mkdir(parents=True)
    holder = MilvusClient(uri=path)  # this test process owns the file now
    service = _AnsweringService(backend.process_env(RIS_MODEL_NAME="efficientnet-lite0"), tmp_path / "service.log")
    try:
        service.start()
        with httpx.Client(base_url=service.url, timeout=60) as client:
            status = client.get("/api/status").json()
            assert status["ready"] is False and "one process per file" in status["error"]
            search = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])})
            assert search.status_code == 503, search.text
            assert search.json()["error"] == "milvus_lite_locked" and "one process per file" in search.json()["detail"]
            assert client.get("/readyz").status_code == 503
    finally:
        service.stop()
        holder.close()
