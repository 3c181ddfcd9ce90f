"""Helpers shared by the test modules: paths, subprocess environments, the storage backends, the service
process, Prometheus scrapes, generated images and toy vectors. tests/conftest.py holds only pytest's hooks
and fixtures (built from these); test modules import from here, never from conftest.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bento.core.config import Settings, settings_from
from bento.domain.schemas import ModelInfo, VectorRecord
from scripts.devstack import BentoService, MilvusServer, S3Server, stack_env

# Set on import: conftest.py imports this module, so it holds before any test (and any process one starts).
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Fixtures that start a server (a Milvus, an S3 server, the service): a test that uses one is slow, so
# `pytest -m "not slow"` (the fast tier) starts no server at all (conftest.py's collection hook marks them).
SERVER_FIXTURES = {"milvus_server", "s3_server", "live_service", "own_s3", "milvus_lite_server", "browser", "keyed_service"}

# The storage configurations the `backend` and `live_service` fixtures run over (see make_backend).
BACKENDS = ["lite-local", "server-s3"]


# --- processes -------------------------------------------------------------------------------------


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
    env.update({"RIS_DATA_DIR": str(data_dir), "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class ServiceProcess(BentoService):
    """The service under test (scripts/devstack.py BentoService), remembering which backend it runs on."""

    backend: Backend | None = None


# --- storage backends ------------------------------------------------------------------------------


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
    """The backend ``name`` (one of BACKENDS); server-s3 starts (or reuses) the session's Milvus and S3
    servers through ``request`` and takes a bucket and a collection of its own."""
    if name == "lite-local":
        return Backend(name, data_dir)
    milvus: MilvusServer = request.getfixturevalue("milvus_server")
    s3: S3Server = request.getfixturevalue("s3_server")
    unique = uuid.uuid4().hex[:12]
    return Backend(name, data_dir, stack_env(milvus, s3, bucket=f"t-{unique}", collection=f"t_{unique}"))


@dataclass
class ImageHost:
    """A plain HTTP server on loopback serving files (and redirects) for search-by-URL tests."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Keys:
    """The API keys of the keyed service (conftest.py keyed_service), one per scope."""

    search: str
    write: str
    admin: str


# --- Prometheus scrapes ----------------------------------------------------------------------------


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))


# --- images, catalogs, toy vectors -----------------------------------------------------------------


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
    from bento.adapters.assembly import open_catalog
    from bento.core.retry import RetryPolicy

    return open_catalog(settings, embedding, retry=RetryPolicy(deadline_s))


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


# --- Kubernetes' service-link variables ------------------------------------------------------------


def service_link_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The variables the kubelet puts into a pod for every Service of its namespace (service links on,
    Kubernetes' default), by its rules (pkg/kubelet/envvars): for each Service with a cluster IP,
    NAME_SERVICE_HOST, NAME_SERVICE_PORT (first port), NAME_SERVICE_PORT_PORTNAME (named ports) and the
    Docker-link forms NAME_PORT (first port) and NAME_PORT_<port>_<PROTO>{,_PROTO,_PORT,_ADDR}; NAME is
    the Service's name upper-cased with "-" as "_". Cluster IPs are made up (10.96.0.x)."""
    env: dict[str, str] = {}
    services = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"]
    for number, service in enumerate(services, start=10):
        name = service["metadata"]["name"].replace("-", "_").upper()
        address = service["spec"].get("clusterIP") or f"10.96.0.{number}"
        ports = service["spec"]["ports"]
        env[f"{name}_SERVICE_HOST"] = address
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{name}_SERVICE_PORT_{port['name'].replace('-', '_').upper()}"] = str(port["port"])
        for index, port in enumerate(ports):
            protocol = port.get("protocol", "TCP")
            url = f"{protocol.lower()}://{address}:{port['port']}"
            if index == 0:
                env[f"{name}_PORT"] = url
            prefix = f"{name}_PORT_{port['port']}_{protocol.upper()}"
            env.update({prefix: url, f"{prefix}_PROTO": protocol.lower(), f"{prefix}_PORT": str(port["port"]), f"{prefix}_ADDR": address})
    return env
