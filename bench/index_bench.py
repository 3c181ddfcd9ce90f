"""Vector-index benchmark: insert time, index build time, single-query search latency, recall@10 against
exact search, and memory per image, for each index type, on a Milvus 2.3.5 server and on Milvus Lite.

``python bench/index_bench.py [--sizes 10000,100000] [--backends server,lite]
[--index-types FLAT,IVF_FLAT,IVF_SQ8,HNSW,IVF_PQ,HNSW_SQ] [--queries 200]``

Ingest and search go through the product's ``VectorIndex`` (same schema, metadata fields, search
parameters and consistency level as the service). Index types outside ``DEFAULT_INDEX_PARAMS`` (candidates:
IVF_PQ on the server, HNSW_SQ on Lite) are built and searched with raw client calls of the same shape.

Vectors are synthetic and shaped like ResNet-50 pooled features (see ``synthetic_features``). The server is
``scripts.devstack.MilvusServer`` in a temporary folder; only one can run on a machine (its metrics port
9091 is fixed), so the script waits while another one runs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bento.adapters.vectors import DEFAULT_INDEX_PARAMS, METADATA_FIELDS, METRIC, VectorIndex, _search_params
from bento.core.config import Settings
from bento.domain.schemas import IndexSpec, ModelInfo, VectorQuery, VectorRecord
from scripts.devstack import MilvusServer

DIM = 2048
TOP_K = 10
CLUSTERS = 1000
MODEL = ModelInfo(
    backbone="resnet50", model_id="synthetic-resnet50-shaped@bench", dim=DIM, preprocessing="synthetic",
    weights="none", pretrained=False,
)
# Index types the product does not offer, measured as candidates: build params and search params.
CANDIDATES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "IVF_PQ": ({"nlist": 1024, "m": 256, "nbits": 8}, {"nprobe": 32}),
    "HNSW_SQ": ({"M": 16, "efConstruction": 200, "sq_type": "SQ8"}, {"ef": 64}),
}
SUPPORTED = {
    "server": ["FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW"],  # Milvus 2.3.5 has no HNSW_SQ
    "lite": ["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ"],  # Lite 3.2.2 builds no IVF_PQ
}
# Bytes one vector costs in the index itself (ids and graph links included), float32 input, dim 2048.
THEORETICAL_BYTES = {
    "FLAT": DIM * 4,
    "IVF_FLAT": DIM * 4 + 8,
    "IVF_SQ8": DIM + 8,
    "IVF_PQ": 256 + 8,  # m=256 sub-quantisers of 8 bits
    "HNSW": DIM * 4 + 16 * 2 * 4,  # M=16: about 2M links of 4 bytes on level 0
    "HNSW_SQ": DIM + 16 * 2 * 4,
}
DATA_NOTE = (
    f"Synthetic 'ResNet-50-shaped' vectors: {DIM}-d, non-negative (post-ReLU), clustered. A per-channel "
    f"baseline activation shared by all images (gamma-distributed), {CLUSTERS} sparse class centres "
    "(ReLU of Gaussians over the baseline), each vector = ReLU(centre + Gaussian noise), L2-normalised; "
    "seeded. Queries: half are held-out noisy copies of stored vectors (near duplicates), half fresh "
    "samples from the same clusters (not stored). Ground truth: exact cosine top-10 in numpy."
)


# --- data ------------------------------------------------------------------------------------------
def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class FeatureModel:
    """Draws vectors that resemble pooled ResNet-50 features (non-negative, clustered, correlated)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.baseline = rng.gamma(0.5, 0.4, DIM).astype(np.float32)
        active = rng.random((CLUSTERS, DIM)) < 0.15  # each class excites a few channels strongly
        self.centres = (self.baseline + active * np.abs(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32))).astype(np.float32)
        self.rng = rng

    def sample(self, n: int, chunk: int = 10_000) -> np.ndarray:
        out = np.empty((n, DIM), dtype=np.float32)
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            labels = self.rng.integers(0, CLUSTERS, size)
            noise = self.rng.standard_normal((size, DIM), dtype=np.float32) * 0.35
            out[start : start + size] = _normalise(np.maximum(self.centres[labels] + noise, 0))
        return out


def near_duplicates(vectors: np.ndarray, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    noise = rng.standard_normal(vectors.shape, dtype=np.float32) * scale
    return _normalise(np.maximum(vectors + noise, 0))


def exact_top_k(stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ stored.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


# --- measurement helpers -------------------------------------------------------------------------------
def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its children (bytes)."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def files_under(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in path.rglob("*") if p.is_file()}


def new_index_bytes(before: dict[Path, int], after: dict[Path, int]) -> int:
    """Bytes of index files that appeared between two listings of the data folder."""
    return sum(size for p, size in after.items() if p not in before and ("index_files" in p.parts or p.suffix == ".idx"))


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Row:
    backend: str
    n: int
    index_type: str
    params: str
    insert_s: float
    build_s: float
    p50_ms: float
    p99_ms: float
    bounded_p50_ms: float
    bounded_p99_ms: float
    recall_dup: float
    recall_fresh: float
    index_bytes: float  # per image, index files written by the backend
    theory_bytes: float
    reported_bytes: float  # per image, loaded size Milvus reports (server: querynode entity_size metric)
    rss_bytes: float  # per image, resident memory added by loading the collection

    @property
    def recall(self) -> float:
        return (self.recall_dup + self.recall_fresh) / 2


# --- one backend --------------------------------------------------------------------------------------
class Backend:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def settings(self, collection: str) -> Settings:
        raise NotImplementedError

    def data_dir(self) -> Path:
        raise NotImplementedError

    def memory(self, index: VectorIndex) -> tuple[float, float]:
        """(bytes the backend reports for the loaded collection, resident bytes loading it adds)."""
        raise NotImplementedError

    def start(self) -> None: ...

    def stop(self) -> None: ...


class ServerBackend(Backend):
    name = "server"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.server = MilvusServer(workdir / "milvus")

    def start(self) -> None:
        waited = 0.0
        while port_busy(9091):  # another Milvus standalone (the test suite?) holds the fixed metrics port
            if waited == 0:
                print("note: port 9091 is busy (another Milvus server runs); waiting for it", file=sys.stderr)
            if waited > 900:
                raise RuntimeError("another Milvus server kept port 9091 for 15 minutes")
            time.sleep(10)
            waited += 10
        if waited:
            print(f"note: waited {waited:.0f} s for the other Milvus server", file=sys.stderr)
        self.server.start()
        time.sleep(3)
        assert self.server.process is not None
        self.idle_rss = tree_rss(self.server.process.pid)

    def stop(self) -> None:
        self.server.stop()

    def settings(self, collection: str) -> Settings:
        return Settings(
            data_dir=self.workdir, milvus={"uri": self.server.uri, "collection": collection, "timeout_s": 120}
        )

    def data_dir(self) -> Path:
        return self.server.data_dir

    def memory(self, index: VectorIndex) -> tuple[float, float]:
        # Growth of the server's resident memory since it started empty. A fresh server per index type would
        # be cleaner, but a restart waits on the stale sessions of the previous run, and memory freed by an
        # earlier build stays mapped: only the first index type's figure is clean, later ones are upper bounds.
        assert self.server.process is not None
        rss = float(tree_rss(self.server.process.pid) - self.idle_rss)
        name = index.settings.milvus.collection
        described = index._run("describe_collection", lambda c, t: c.describe_collection(name, timeout=t))
        collection_id = str(described["collection_id"])
        reported = 0.0
        for line in httpx.get("http://127.0.0.1:9091/metrics", timeout=10).text.splitlines():
            if line.startswith("milvus_querynode_entity_size{") and f'collection_id="{collection_id}"' in line and 'segment_state="Sealed"' in line:
                reported += float(line.rsplit(" ", 1)[1])
        return reported, rss


_LITE_RSS_CHILD = """
import json, sys, psutil
from pymilvus import MilvusClient
proc = psutil.Process()
client = MilvusClient(sys.argv[1])
client.release_collection(sys.argv[2])
before = proc.memory_info().rss
client.load_collection(sys.argv[2], timeout=600)
client.search(sys.argv[2], [[0.0] * int(sys.argv[3])], limit=1, output_fields=["label"])
print(json.dumps(proc.memory_info().rss - before))
"""


class LiteBackend(Backend):
    name = "lite"

    def settings(self, collection: str) -> Settings:
        return Settings(data_dir=self.workdir, milvus={"collection": collection, "timeout_s": 120})

    def data_dir(self) -> Path:
        return self.workdir / "milvus.db"

    def memory(self, index: VectorIndex) -> tuple[float, float]:
        # Lite runs inside the caller: measure a fresh process that opens and loads the same file.
        from milvus_lite.server_manager import server_manager_instance

        index.close()
        server_manager_instance.release_server(str(self.data_dir()))
        out = subprocess.run(
            [sys.executable, "-c", _LITE_RSS_CHILD, str(self.data_dir()), index.settings.milvus.collection, str(DIM)],
            capture_output=True, text=True, timeout=900,
        )
        if out.returncode != 0:
            print(f"note: Lite RSS probe failed: {out.stderr[-500:]}", file=sys.stderr)
            return float("nan"), float("nan")
        return float("nan"), float(json.loads(out.stdout.strip().splitlines()[-1]))


# --- the measurement ------------------------------------------------------------------------------------
def ingest(index: VectorIndex, vectors: np.ndarray, chunk: int = 2000) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), chunk):
        records = [
            VectorRecord(
                id=f"{i:064x}", label="", mime="image/jpeg", width=224, height=224, size_bytes=0,
                source="", created_at=0, vector=vectors[i].tolist(),
            )
            for i in range(start, min(start + chunk, len(vectors)))
        ]
        index.upsert(records)
    index.flush()
    return time.perf_counter() - started


def build(index: VectorIndex, index_type: str) -> str:
    """(Re)build the index and load it; returns its build + search parameters."""
    if index_type in DEFAULT_INDEX_PARAMS:
        spec = index.rebuild_index(IndexSpec(index_type=index_type)).index  # type: ignore[arg-type]
        return json.dumps(spec.params | _search_params(spec, TOP_K))
    build_params, search_params = CANDIDATES[index_type]
    name = index.settings.milvus.collection
    index._run("release_collection", lambda c, t: c.release_collection(name, timeout=t))
    for index_name in index._run("list_indexes", lambda c, t: c.list_indexes(name, timeout=t)):
        index._run("drop_index", lambda c, t, index_name=index_name: c.drop_index(name, index_name, timeout=t))
    params = index._milvus().prepare_index_params()
    params.add_index("vector", index_type=index_type, metric_type=METRIC, params=dict(build_params))
    index._run("create_index", lambda c, t: c.create_index(name, params, timeout=t), timeout=900)
    index._run("load_collection", lambda c, t: c.load_collection(name, timeout=t), timeout=900)
    return json.dumps(build_params | search_params) + " (candidate)"


def searcher(index: VectorIndex, index_type: str, consistency: str = "Strong") -> Callable[[np.ndarray], list[int]]:
    """One single-vector search. Strong on a product index type: the service's own call
    (VectorIndex.search); otherwise the same call through the client, with that consistency level."""
    name = index.settings.milvus.collection
    if index_type in DEFAULT_INDEX_PARAMS:
        if consistency == "Strong":

            def product_search(vector: np.ndarray) -> list[int]:
                hits = index.search(VectorQuery(vector=vector.tolist(), top_k=TOP_K))
                return [int(h.image.id, 16) for h in hits]

            return product_search
        described = index._run("describe_collection", lambda c, t: c.describe_collection(name, timeout=t))
        spec = IndexSpec.model_validate_json(described["properties"]["ris.index"])
        search_params = _search_params(spec, TOP_K)
    else:
        search_params = CANDIDATES[index_type][1]

    def raw_search(vector: np.ndarray) -> list[int]:
        result = index._run(
            "search",
            lambda c, t: c.search(
                name, [vector.tolist()], limit=TOP_K, output_fields=METADATA_FIELDS,
                search_params={"metric_type": METRIC, "params": search_params}, consistency_level=consistency,
                timeout=t,
            ),
        )
        return [int(hit["id"], 16) for hit in result[0]]

    return raw_search


def timed(search: Callable[[np.ndarray], list[int]], queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    for q in queries[:5]:  # warm-up
        search(q)
    latencies, found = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, found


def wait_indexed(index: VectorIndex, n: int, timeout_s: float = 900) -> None:
    """The server builds asynchronously after sealing; wait until every row is indexed."""
    name = index.settings.milvus.collection
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = index._run("list_indexes", lambda c, t: c.list_indexes(name, timeout=t))
        info: dict[str, Any] = {}
        if names:
            info = index._run("describe_index", lambda c, t, first=names[0]: c.describe_index(name, first, timeout=t))
        if "indexed_rows" not in info or int(info["indexed_rows"]) >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"index not built after {timeout_s} s")


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / TOP_K for f, t in zip(found, truth, strict=True)]))


def run_backend(backend: Backend, sizes: list[int], index_types: list[str], n_queries: int, seed: int) -> list[Row]:
    rows: list[Row] = []
    backend.start()
    try:
        for n in sizes:
            features = FeatureModel(seed)
            stored = features.sample(n)
            qrng = np.random.default_rng(seed + 1)
            half = n_queries // 2
            dup_queries = near_duplicates(stored[qrng.choice(n, half, replace=False)], qrng)
            fresh_queries = features.sample(n_queries - half)
            queries = np.concatenate([dup_queries, fresh_queries])
            truth = exact_top_k(stored, queries, TOP_K)
            collection = f"bench_{n}"
            index = VectorIndex(backend.settings(collection), MODEL)
            insert_s = ingest(index, stored)
            wait_indexed(index, n)  # the server indexes the first build in the background
            del stored
            gc.collect()
            print(f"[{backend.name} {n}] inserted in {insert_s:.1f} s", file=sys.stderr)
            for index_type in index_types:
                if index_type not in SUPPORTED[backend.name]:
                    continue
                before = files_under(backend.data_dir())
                started = time.perf_counter()
                params = build(index, index_type)
                wait_indexed(index, n)
                build_s = time.perf_counter() - started
                index_bytes = new_index_bytes(before, files_under(backend.data_dir()))
                reported, rss = backend.memory(index)
                index.close()
                index = VectorIndex(backend.settings(collection), MODEL)  # Lite: opened again after the probe
                index.ensure_ready()
                latencies, found = timed(searcher(index, index_type), queries)
                # Lite has no time ticks: consistency levels cost nothing there.
                bounded = timed(searcher(index, index_type, "Bounded"), queries)[0] if backend.name == "server" else [float("nan")]
                row = Row(
                    backend.name, n, index_type, params, insert_s, build_s,
                    statistics.median(latencies), percentile(latencies, 99),
                    statistics.median(bounded), percentile(bounded, 99),
                    recall(found[:half], truth[:half]), recall(found[half:], truth[half:]),
                    index_bytes / n, THEORETICAL_BYTES[index_type], reported / n, rss / n,
                )
                rows.append(row)
                print(f"[{backend.name} {n}] {row}", file=sys.stderr)
            index._run("drop_collection", lambda c, t, collection=collection: c.drop_collection(collection, timeout=t))
            index.close()
    finally:
        backend.stop()
    return rows


def _num(value: float) -> str:
    return "—" if value != value or value == 0 else f"{value:,.0f}"


def _ms(value: float) -> str:
    return "—" if value != value else f"{value:.1f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| backend | N | index | params (build + search) | insert s | build+load s | p50 ms | p99 ms "
        "| p50 ms Bounded | p99 ms Bounded "
        "| recall@10 dup | recall@10 fresh | index bytes/img (files) | bytes/img (theory) | loaded bytes/img (Milvus metric) | RSS bytes/img (load) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.backend} | {r.n:,} | {r.index_type} | `{r.params}` | {r.insert_s:.0f} | {r.build_s:.1f} "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {_ms(r.bounded_p50_ms)} | {_ms(r.bounded_p99_ms)} | {r.recall_dup:.3f} | {r.recall_fresh:.3f} "
            f"| {_num(r.index_bytes)} | {r.theory_bytes:,.0f} | {_num(r.reported_bytes)} | {_num(r.rss_bytes)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--backends", default="server,lite")
    parser.add_argument("--index-types", default="FLAT,IVF_FLAT,IVF_SQ8,IVF_PQ,HNSW,HNSW_SQ")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards when given")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    index_types = [t.strip().upper() for t in args.index_types.split(",")]
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="index_bench_"))
    rows: list[Row] = []
    try:
        for name in args.backends.split(","):
            cls = {"server": ServerBackend, "lite": LiteBackend}[name.strip()]
            rows += run_backend(cls(workdir / name.strip()), sizes, index_types, args.queries, args.seed)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(DATA_NOTE)
    print(f"\n{args.queries} single queries per row, top_k {TOP_K}, with the product's metadata fields; {os.cpu_count()} CPU "
          "cores. p50/p99: VectorIndex.search as the service calls it (RIS_MILVUS_SEARCH_CONSISTENCY, default Session); Bounded: the same "
          "search at consistency Bounded.\n")
    print(table(rows))
    print(
        "\nindex bytes/img (files): size of the index files the backend wrote for this build / N. "
        "bytes/img (theory): vector payload + ids/links of the index type. RSS bytes/img: resident memory a "
        "server: growth of the server's resident memory since it started empty (cumulative over the builds of "
        "one N: only the first index type of each N is clean); Lite: what a fresh process gains by loading the "
        "file / N. loaded bytes/img: the server's own "
        "milvus_querynode_entity_size metric for the sealed segments / N. Index file sizes are compressed on the "
        "server, so they understate memory."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
