"""Every benchmark, one after the other on an otherwise idle machine, into one markdown report.

``python bench/run.py [--quick] [--out bench/results/latest.md]``

Sections (each is also a script of its own, see bench/README.md):
1. runtimes.py      ResNet-50: runtime x batch size, JPEG decode (full vs draft), end-to-end JPEG -> vector
                    with per-image fidelity to eager fp32; EfficientNet-Lite0 (genuine weights): fidelity
                    and near-duplicate recall@1 per runtime
2. batch_curve.py   the default runtime's batch-size/latency curve (the adaptive batching settings)
3. ingest_rate.py   the ingest job end to end (decode, thumbnails, embed, store, Milvus Lite) per runtime
4. serving.py       cold start, batching on/off under 32 concurrent uploaders, HTTP search at 10k/100k
                    vectors on Milvus Lite and the Milvus 2.3.5 server
5. index_bench.py   recall@10 vs exact and memory per image of each index type (2048-d)
6. gpu_check.py     the GPU path (on a CPU-only machine: the CPU smoke run)

``--quick`` shrinks every section (minutes instead of ~40 min) to check the scripts, not to measure.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

FULL = [
    ("Embedding runtimes (ResNet-50)", ["runtimes.py", "--model", "resnet50"]),
    ("Fidelity with genuine weights (EfficientNet-Lite0)",
     ["runtimes.py", "--model", "efficientnet-lite0", "--batches", "1,32",
      "--runtimes", "torch-fp32,openvino-fp32,openvino-bf16,openvino-int8"]),
    ("Batch curve of the default runtime (ResNet-50)", ["batch_curve.py", "--model", "resnet50"]),
    ("Ingest job", ["ingest_rate.py", "--images", "512"]),
    ("Serving", ["serving.py", "--sizes", "10000,100000", "--backends", "lite,server", "--seconds", "30"]),
    ("Vector index: recall and memory", ["index_bench.py", "--sizes", "100000", "--backends", "server,lite",
                                         "--index-types", "HNSW,IVF_SQ8"]),
    ("GPU path", ["gpu_check.py"]),
]
QUICK = [
    ("Embedding runtimes (ResNet-50)", ["runtimes.py", "--model", "resnet50", "--batches", "1,8",
                                        "--images", "32", "--runtimes", "torch-fp32,openvino-bf16"]),
    ("Batch curve", ["batch_curve.py", "--model", "efficientnet-lite0", "--sizes", "1,4", "--repeats", "1"]),
    ("Ingest job", ["ingest_rate.py", "--images", "32", "--runtimes", "openvino-bf16"]),
    ("Serving", ["serving.py", "--sizes", "1000", "--backends", "lite", "--seconds", "3", "--concurrency", "4",
                 "--requests", "10"]),
    ("GPU path", ["gpu_check.py", "--smoke"]),
]


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo").read()
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f" {f}" in flags]
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs ({', '.join(extras)}), {memory_gb:.0f} GB RAM, {platform.platform()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "latest.md")
    parser.add_argument("--only", default="", help="comma-separated script names to run (default: all)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.only:
        wanted = set(args.only.split(","))
        plan = [step for step in plan if step[1][0] in wanted]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
    lines = [
        f"# Benchmarks ({'quick check' if args.quick else 'full run'}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}",
        "",
    ]
    print("\n".join(lines), flush=True)
    failures = 0
    for title, command in plan:
        started = time.monotonic()
        header = f"\n# {title}  (`python bench/{' '.join(command)}`)\n"
        print(header, flush=True)
        done = subprocess.run(
            [sys.executable, str(BENCH / command[0]), *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True
        )
        # Keep the tables and findings; library warnings and progress bars go to the log only.
        kept = [line for line in done.stdout.splitlines() if not line.startswith(("W1", "I1", "E1"))]
        body = "\n".join(kept)
        if done.returncode != 0:
            failures += 1
            body += f"\n\n**failed (exit {done.returncode})**:\n```\n{done.stderr[-3000:]}\n```"
        body += f"\n\n({time.monotonic() - started:.0f} s)"
        print(body, flush=True)
        lines += [header, body]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"\nreport written to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
