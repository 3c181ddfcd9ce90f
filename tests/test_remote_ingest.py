"""`ingest --service-url`: embed through a running service while both share a Milvus server.

Milvus Lite allows one process per file, so the service and the job share `milvus-lite server`
(a real gRPC Milvus endpoint) by URI: the same setup as a deployment with a Milvus server.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bento.core.ids import content_hash
from scripts.devstack import free_port
from tests.support import ServiceProcess, run_cli, service_env

pytestmark = pytest.mark.slow


@pytest.fixture
def milvus_lite_server(tmp_path):
    port = free_port()
    binary = Path(sys.executable).parent / "milvus-lite"
    log = (tmp_path / "milvus.log").open("wb")
    process = subprocess.Popen(
        [str(binary), "server", "--data-dir", str(tmp_path / "milvus"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    from pymilvus import MilvusClient

    deadline = time.monotonic() + 60
    while True:
        try:
            MilvusClient(uri=uri, timeout=2).close()
            break
        except Exception:  # noqa: BLE001 - polling until the server answers
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError((tmp_path / "milvus.log").read_text()[-3000:]) from None
            time.sleep(0.3)
    yield uri
    process.terminate()
    process.wait(timeout=30)


def test_ingest_through_a_running_service(milvus_lite_server, efficientnet, photo_set, tmp_path):
    env = service_env(tmp_path / "data", RIS_MODEL_NAME="efficientnet-lite0", RIS_MILVUS_URI=milvus_lite_server)
    service = ServiceProcess(env, tmp_path / "service.log")
    service.start()
    try:
        result = run_cli(
            ["-m", "ingest", str(photo_set["root"]), "--service-url", service.url, "--no-progress", "--json"], env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        expected = sum(1 for p in photo_set["root"].rglob("*") if p.is_file())
        assert report["ingested"] == expected and report["model"].startswith("efficientnet-lite0@")
        with httpx.Client(base_url=service.url, timeout=60) as client:
            status = client.get("/api/status").json()
            assert status["image_count"] == expected and status["milvus_backend"] == "milvus-server"
            response = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["chelsea"])})
            assert response.json()["hits"][0]["id"] == content_hash(photo_set["originals"]["chelsea"])
    finally:
        service.stop()
