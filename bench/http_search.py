"""Search latency over the HTTP API of a running service (upload -> results), sequential requests.

``python bench/http_search.py [--url http://127.0.0.1:3000] [--requests 200] [--top-k 12]``
Queries are near-duplicates of the bundled demo photos (see ingest/demo.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.demo import near_duplicate, photos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=12)
    args = parser.parse_args()
    queries = [near_duplicate(image, seed=i) for i, (_, _, image) in enumerate(photos())]
    with httpx.Client(base_url=args.url, timeout=60) as client:
        status = client.get("/api/status").json()
        for query in queries[:5]:  # warm-up
            client.post("/api/search", files={"file": ("q.jpg", query)})
        wall, server_total, embed, search = [], [], [], []
        for i in range(args.requests):
            start = time.perf_counter()
            response = client.post("/api/search", files={"file": ("q.jpg", queries[i % len(queries)])}, data={"top_k": str(args.top_k)})
            wall.append((time.perf_counter() - start) * 1000)
            response.raise_for_status()
            timings = response.json()["timings"]
            server_total.append(timings["total_ms"])
            embed.append(timings["embed_ms"])
            search.append(timings["search_ms"])

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]

    print(f"{status['image_count']} images, model {status['model']['model_id']}, {status['index']['index_type']}, {status['milvus_backend']}")
    print(f"{'measure':<22} {'p50 ms':>8} {'p99 ms':>8}")
    for name, values in (("HTTP round trip", wall), ("server total", server_total), ("embed", embed), ("vector search", search)):
        print(f"{name:<22} {statistics.median(values):>8.1f} {pct(values, 99):>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
