"""The product's image run as deployed: the API and the embedder as two containers, each started with
the command, environment, secrets and security context of its Deployment in the rendered cpu overlay
(non-root uid, read-only root filesystem, writable only where the manifest mounts a volume, no
capabilities), against a real Milvus server and S3 server on this host.

Only the addresses differ from a cluster (every container shares this host's network, so each gets its
own port and reaches Milvus, S3 and the embedder on 127.0.0.1). Run by scripts/container-test.sh after
scripts/container.sh has built the image (CONTAINER_IMAGE names another one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bento.auth import hash_key, new_key
from bento.imaging import content_hash
from scripts.devstack import free_port
from tests.conftest import ROOT, run_cli, service_env

pytestmark = pytest.mark.container
IMAGE = os.environ.get("CONTAINER_IMAGE", "localhost/reverse-image-search:latest")
CONTAINERS_CONF = Path(os.environ.get("CONTAINERS_CONF") or Path.home() / ".cache/ris-containers/containers.conf")
ADMIN_KEY = new_key()


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module", autouse=True)
def image() -> str:
    if shutil.which("podman") is None or podman("image", "exists", IMAGE, check=False).returncode != 0:
        reason = f"no image {IMAGE}: run scripts/container.sh first (scripts/container-test.sh does both)"
        if os.environ.get("CONTAINER_TEST_REQUIRED"):  # scripts/container-test.sh: a skip would hide a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return IMAGE


def render(overlay: str) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / overlay)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass
class Container:
    """One container of a rendered Deployment, as `podman run` options."""

    name: str
    args: list[str]
    env: dict[str, str]
    options: list[str] = field(default_factory=list)
    port: int = 0

    @classmethod
    def of(cls, docs: list[dict[str, Any]], deployment: str, secrets: dict[str, dict[str, str]], files: Path) -> Container:
        spec = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == deployment)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = str(entry["value"])
            elif "secretKeyRef" in entry["valueFrom"]:
                ref = entry["valueFrom"]["secretKeyRef"]
                if ref["key"] in secrets.get(ref["name"], {}):
                    env[entry["name"]] = secrets[ref["name"]][ref["key"]]
                else:
                    assert ref.get("optional"), f"the test has no value for the required secret {ref}"
            else:
                ref = entry["valueFrom"]["configMapKeyRef"]
                env[entry["name"]] = config_maps[ref["name"]][ref["key"]]
        pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
        options = [f"--user={pod_security['runAsUser']}:{pod_security.get('runAsGroup', pod_security['runAsUser'])}"]
        if security.get("readOnlyRootFilesystem"):
            options.append("--read-only")
        if "ALL" in security.get("capabilities", {}).get("drop", []):
            options.append("--cap-drop=ALL")
        if security.get("allowPrivilegeEscalation") is False:
            options.append("--security-opt=no-new-privileges")
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                options.append(f"--mount=type=tmpfs,destination={mount['mountPath']},tmpfs-mode=1777")
            elif "secret" in volume:
                folder = files / volume["secret"]["secretName"]
                folder.mkdir(parents=True, exist_ok=True)
                for item in volume["secret"].get("items", []):
                    (folder / item["path"]).write_text(secrets[volume["secret"]["secretName"]][item["key"]])
                    os.chmod(folder / item["path"], 0o444)
                options.append(f"--volume={folder}:{mount['mountPath']}:ro")
            else:
                raise AssertionError(f"the test cannot mount {volume}")
        return cls(deployment, list(container.get("args", [])), env, options)

    def start(self) -> float:
        """Start (with this host's addresses and port) and wait until ready; returns the seconds it took."""
        self.port = self.port or free_port()
        args = [a if a != "3000" else str(self.port) for a in self.args]
        env_args = [f"--env={key}={value}" for key, value in self.env.items()]
        podman("rm", "-f", self.name, check=False)
        started = time.monotonic()
        podman("run", "-d", "--name", self.name, "--network=host", *self.options, *env_args, IMAGE, *args)
        probe = "/ready" if self.name == "ris-api" else "/readyz"
        deadline = started + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}{probe}", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            state = podman("inspect", "-f", "{{.State.Running}}", self.name, check=False).stdout.strip()
            assert state == "true", f"{self.name} exited:\n{self.logs()}"
            time.sleep(1)
        raise AssertionError(f"{self.name} not ready in 600 s:\n{self.logs()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-6000:]

    def stop(self) -> None:
        podman("stop", "-t", "15", self.name, check=False)

    def remove(self) -> None:
        podman("rm", "-f", self.name, check=False)


@pytest.fixture(scope="module")
def deployed(milvus_server, s3_server, tmp_path_factory):
    """The embedder and the API of the cpu overlay, up and ready."""
    docs = render("overlays/cpu")
    secrets = {
        "ris-s3": {"RIS_S3_ACCESS_KEY": s3_server.access_key, "RIS_S3_SECRET_KEY": s3_server.secret_key},
        "ris-api-keys": {"keys": f"ingest:admin:{hash_key(ADMIN_KEY)}\n"},
    }
    files = tmp_path_factory.mktemp("secrets")
    embedder = Container.of(docs, "ris-embedder", secrets, files)
    api = Container.of(docs, "ris-api", secrets, files)
    here = {"RIS_MILVUS_URI": milvus_server.uri, "RIS_MILVUS_COLLECTION": "deployed", "RIS_S3_ENDPOINT": s3_server.endpoint,
            "RIS_S3_BUCKET": "deployed"}
    api.env.update(here)
    embedder.port = free_port()
    api.env["RIS_SERVICES_EMBEDDER_URL"] = embedder.url
    cold = {"embedder": embedder.start()}
    cold["api"] = api.start()
    # The ingest Job's settings: the same ConfigMap and secrets as the API (it writes to Milvus and S3
    # itself and embeds through the API).
    job_env = {k: v for k, v in api.env.items() if k.startswith(("RIS_MILVUS_", "RIS_S3_", "RIS_STORE_"))}
    yield {"api": api, "embedder": embedder, "cold_start_s": cold, "job_env": job_env}
    for container in (api, embedder):
        container.remove()


def test_the_deployed_containers_serve_search_ingest_and_metrics(deployed, photo_set, efficientnet):
    api = deployed["api"]
    print("cold start (podman run -> ready), seconds:", json.dumps({k: round(v, 1) for k, v in deployed["cold_start_s"].items()}))
    with httpx.Client(base_url=api.url, timeout=120) as client:
        answer = client.get("/api/status", headers={"X-API-Key": ADMIN_KEY})
        assert answer.status_code == 200, answer.text + "\n--- api:\n" + api.logs()
        status = answer.json()
        assert status["ready"] and status["milvus_backend"] == "milvus-server" and status["store"]["backend"] == "s3"
        assert client.get("/").status_code == 200

        ingest = run_cli(
            ["-m", "ingest", str(photo_set["root"]), "--service-url", api.url, "--api-key", ADMIN_KEY, "--no-progress", "--json"],
            service_env(Path("/tmp/unused"), **deployed["job_env"]),
        )
        assert ingest.returncode == 0, ingest.stderr[-3000:] + "\n--- embedder:\n" + deployed["embedder"].logs() + "\n--- api:\n" + api.logs()
        report = json.loads(ingest.stdout)
        assert report["rejected"] == [] and report["ingested"] == report["scanned"]
        for name in ("astronaut", "coffee", "rocket"):
            hits = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"][name])}).json()["hits"]
            assert hits[0]["id"] == content_hash(photo_set["originals"][name])

        # The names and labels the autoscalers query exist in a real scrape (before the operator relabels:
        # BentoML's `endpoint` becomes `exported_endpoint` there, k8s/overlays/gpu/servicemonitors.yaml).
        metrics = client.get("/metrics").text
        assert 'bentoml_service_request_total{' in metrics and 'endpoint="/api/search"' in metrics
        assert 'runner_name="image-search"' in metrics
        embedder_metrics = httpx.get(f"{deployed['embedder'].url}/metrics", timeout=30).text
        assert "bentoml_service_request_in_progress" in embedder_metrics and 'runner_name="embedder"' in embedder_metrics
        # Batches crossed to the embedder as binary .npy files, not as JSON arrays.
        npy_calls = re.search(r'bentoml_service_request_total\{[^}]*endpoint="/embed_npy"[^}]*http_response_code="200"[^}]*\} (\d+)', embedder_metrics)
        assert npy_calls and int(npy_calls.group(1)) > 0, "no /embed_npy calls answered 200"


def test_without_an_embedder_the_api_stays_ready_and_only_upload_search_fails(deployed, photo_set):
    api, embedder = deployed["api"], deployed["embedder"]
    original = content_hash(photo_set["originals"]["coffee"])
    with httpx.Client(base_url=api.url, timeout=120) as client:
        assert client.get(f"/api/images/{original}/metadata").status_code == 200, "ingested by the test before"
        embedder.stop()
        try:
            started = time.monotonic()
            search = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])})
            assert search.status_code == 503 and time.monotonic() - started < 30, search.text
            assert search.headers.get("retry-after")
            assert client.get("/ready").status_code == 200, "the API pod stays ready: the page and reads keep working"
            assert client.get("/").status_code == 200
            by_id = client.post("/api/search/id", json={"id": original})
            assert by_id.status_code == 200 and by_id.json()["hits"][0]["id"] == original
            assert client.get(f"/api/images/{original}").content == photo_set["originals"]["coffee"]
            assert client.get("/api/images", params={"limit": 5}).status_code == 200
        finally:
            podman("start", embedder.name)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            again = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])})
            if again.status_code == 200:
                break
            time.sleep(2)
        assert again.status_code == 200 and again.json()["hits"][0]["id"] == original
