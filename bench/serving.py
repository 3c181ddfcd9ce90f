"""The service under load, side by side in one run: cold start, adaptive batching on vs off with 32
concurrent uploaders, and single-request HTTP search latency with 10k / 100k vectors in the index
(Milvus Lite file and the Milvus 2.3.5 server).

``python bench/serving.py [--sizes 10000,100000] [--backends lite,server] [--concurrency 32] [--seconds 30]``

Each scenario starts its own `bentoml serve service:ImageSearch` (ResNet-50 architecture, random-init
weights unless RIS_MODEL_RESNET50_WEIGHTS names real ones; default runtime unless RIS_MODEL_RUNTIME /
RIS_MODEL_PRECISION are set). Index scenarios are pre-filled with synthetic ResNet-50-like vectors
(bench/index_bench.py FeatureModel) under the served model's identity; the queries are real photo uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from index_bench import FeatureModel, wait_indexed  # noqa: E402

from bento.adapters.vectors import VectorIndex  # noqa: E402
from bento.core.config import BatchingSettings, Settings, settings_from  # noqa: E402
from bento.domain.schemas import VectorRecord  # noqa: E402
from ingest.demo import encode, near_duplicate, photos  # noqa: E402
from scripts.devstack import BentoService  # noqa: E402


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    # RIS_* settings of the caller pass through (e.g. RIS_MODEL_RUNTIME, RIS_SERVICES_API_WORKERS on a big
    # machine); the model defaults to ResNet-50 and each scenario gets its own data directory.
    env = dict(os.environ)
    env.setdefault("RIS_MODEL_NAME", "resnet50")
    env.setdefault("RIS_MODEL_RESNET50_WEIGHTS", "random")
    env.update(BENTOML_DO_NOT_TRACK="true", RIS_DATA_DIR=str(data_dir))
    env.update(extra)
    return env


def batching(on: bool) -> dict[str, str]:
    """The embedder's adaptive batching on (the caller's RIS_BATCHING_MAX_BATCH_SIZE, else the default) or
    off (a batch size of 1)."""
    if not on:
        return {"RIS_BATCHING_MAX_BATCH_SIZE": "1"}
    if os.environ.get("RIS_BATCHING_MAX_BATCH_SIZE", "").strip() == "1":
        return {"RIS_BATCHING_MAX_BATCH_SIZE": str(BatchingSettings().max_batch_size)}
    return {}


@contextmanager
def serve(env: dict[str, str], log: Path):
    """Yield (base url, seconds from process start to /readyz 200)."""
    service = BentoService(env, log)
    cold = service.start(timeout_s=600)
    try:
        yield service.url, cold
    finally:
        service.stop()


def query_photos() -> list[bytes]:
    return [near_duplicate(image, seed=i) for i, (_, _, image) in enumerate(photos())]


def pct(values: list[float], q: int) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def load_test(url: str, uploads: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients upload back to back for ``seconds``; 503s are counted, not retried."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(index: int, http: httpx.AsyncClient) -> None:
        i = index
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            response = await http.post("/api/search", files={"file": ("q.jpg", uploads[i % len(uploads)])})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                latencies.append((time.perf_counter() - start) * 1000)
            i += concurrency

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for data in uploads[:4]:  # warm-up
            await http.post("/api/search", files={"file": ("q.jpg", data)})
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "rps": len(latencies) / elapsed,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "ok": len(latencies),
        "errors": sum(n for code, n in statuses.items() if code != 200),
        "503": statuses.get(503, 0),
    }


def sequential(url: str, uploads: list[bytes], requests: int) -> dict[str, float]:
    wall, search = [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        for data in uploads[:5]:
            http.post("/api/search", files={"file": ("q.jpg", data)}).raise_for_status()
        for i in range(requests):
            start = time.perf_counter()
            response = http.post("/api/search", files={"file": ("q.jpg", uploads[i % len(uploads)])}, data={"top_k": "10"})
            wall.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
            search.append(response.json()["timings"]["search_ms"])
    return {"p50": pct(wall, 50), "p99": pct(wall, 99), "search_p50": pct(search, 50), "search_p99": pct(search, 99)}


def model_info(url: str):
    from bento.domain.schemas import ModelInfo

    return ModelInfo.model_validate(httpx.get(f"{url}/api/status", timeout=10).json()["model"])


def fill(settings: Settings, info, count: int, seed: int = 0) -> float:
    """Insert ``count`` synthetic vectors under the served model's identity; seconds incl. index build."""
    # Bulk loading 100k rows makes Milvus Lite compact/index segments inside some upserts: allow for it.
    index = VectorIndex(settings.but(milvus={"timeout_s": 600.0}), info)
    started = time.perf_counter()
    features = FeatureModel(seed)
    try:
        for start in range(0, count, 2000):
            size = min(2000, count - start)
            vectors = features.sample(size)
            index.upsert([
                VectorRecord(
                    id=secrets.token_hex(32), label=f"class-{j % 1000}", mime="image/jpeg", width=500, height=375,
                    size_bytes=100_000, source="synthetic", created_at=0, vector=vectors[j].tolist(),
                )
                for j in range(size)
            ])
        index.flush()
        # A server builds the index asynchronously after sealing: measure searches on the built index.
        wait_indexed(index, count)
    finally:
        index.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--backends", default="lite,server")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--requests", type=int, default=200, help="sequential searches per index size")
    parser.add_argument("--skip-batching", action="store_true", help="only the index-size scenarios")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ris-serving-"))
    os.environ.setdefault("BENTOML_HOME", str(work / "bentoml"))
    log = work / "service.log"
    uploads = query_photos()
    print(f"# Serving: logs in {log}\n")

    # The model goes into the store first (a one-time step: in a bento it is already there), so the cold
    # starts below measure the service: the first converts the model for OpenVINO, the next reuse the cache.
    subprocess.run([sys.executable, "-m", "models", "import"], cwd=ROOT, env=base_env(work / "import"), check=True,
                   capture_output=True)

    # 1. Cold start and batching on/off: a small collection (the photos), so the embedder is the load.
    if not args.skip_batching:
        batching_scenarios(args, work, log, uploads)
    search_scenarios(args, work, log, uploads)
    return 0


def batching_scenarios(args: argparse.Namespace, work: Path, log: Path, uploads: list[bytes]) -> None:
    print(f"## Adaptive batching on vs off: {args.concurrency} concurrent uploaders, {args.seconds:.0f} s each")
    print("(cold start: process start -> /readyz 200; the first row converts the model, later ones reuse the runtime cache)")
    print("| embedder batching | cold start s | requests/s | p50 ms | p99 ms | ok | errors (503) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = {}
    for name, batch in (("off", "false"), ("on", "true")):
        data_dir = work / f"batching-{batch}"
        with serve(base_env(data_dir, **batching(batch == "true")), log) as (url, cold):
            with httpx.Client(base_url=url, timeout=60) as http:
                for i, (_, _, image) in enumerate(photos()):
                    http.post("/api/images", files={"file": (f"{i}.jpg", encode(image))}).raise_for_status()
            results[batch] = r = asyncio.run(load_test(url, uploads, args.concurrency, args.seconds))
        print(f"| {name} | {cold:.1f} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['ok']} | {r['errors']} ({r['503']}) |")
    print(f"\nbatching on / off throughput: {results['true']['rps'] / results['false']['rps']:.2f}x\n")


def search_scenarios(args: argparse.Namespace, work: Path, log: Path, uploads: list[bytes]) -> None:
    """Search latency with N vectors in the index."""
    sizes = [int(s) for s in args.sizes.split(",") if s]
    backends = [b for b in args.backends.split(",") if b]
    print("## Single search over HTTP (upload -> results, top_k 10, sequential), synthetic 2048-d vectors")
    print("| backend | vectors | index | fill + index s | HTTP p50 ms | HTTP p99 ms | vector search p50 ms | p99 ms |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for backend in backends:
        server = None
        if backend == "server":
            from scripts.devstack import MilvusServer

            server = MilvusServer(work / "milvus")
            server.start()
        try:
            for size in sizes:
                data_dir = work / f"{backend}-{size}"
                extra = {"RIS_MILVUS_COLLECTION": f"bench_{size}"}
                if server is not None:
                    extra["RIS_MILVUS_URI"] = server.uri
                env = base_env(data_dir, **extra)
                # Learn the served model identity, stop, fill (a Lite file has one owner), serve again.
                with serve(env, log) as (url, _):
                    info = model_info(url)
                settings = settings_from(env)
                # In a child process: a Milvus Lite file stays locked by the process that opened it.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    seconds = pool.submit(fill, settings, info, size).result()
                with serve(env, log) as (url, _):
                    status = httpx.get(f"{url}/api/status", timeout=10).json()
                    r = sequential(url, uploads, args.requests)
                print(
                    f"| {backend} | {status['image_count']} | {status['index']['index_type']} | {seconds:.0f} | {r['p50']:.0f} | "
                    f"{r['p99']:.0f} | {r['search_p50']:.1f} | {r['search_p99']:.1f} |"
                )
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
