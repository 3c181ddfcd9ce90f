"""GPU check of the embedding path, one command, one markdown table per part; exits non-zero on any failure.

``python bench/gpu_check.py [--batches 1,32,128] [--concurrency 32] [--seconds 20] [--photos N] [--smoke]``

- Part A, each role's embedder alone: ``load_embedder`` (the similarity ResNet-50 and the copy model, Meta's
  SSCD ResNet-50; random-init weights unless RIS_MODEL_RESNET50_WEIGHTS / RIS_MODEL_SSCD_WEIGHTS name real ones; device auto, so CUDA when torch sees one, with the runtime the service would pick there:
  fp16 autocast + channels-last) at each batch size: images/s, ms per batch and, on CUDA, the peak of
  ``torch.cuda.max_memory_allocated``. Then fidelity: real photos (ingest.demo.photos(), prepared as the
  service prepares uploads) through that runtime and through PyTorch fp32 on the CPU; the smallest cosine
  must reach models.runtime.FIDELITY_FLOOR (0.99).
- Part B, through the service: ``bentoml serve service:ImageSearch`` with adaptive batching on, then off
  (RIS_BATCHING_MAX_BATCH_SIZE=1; bench/serving.py's serve() and load_test()), each loaded by N concurrent
  uploaders of near-duplicate photos to POST /api/search for S seconds: requests/s, p50/p99, errors, and the
  on/off ratio. Any non-200 answer (503s included) is a failure.

``--smoke`` (batches 1,4; 4 uploaders; 3 s; 4 photos) is the CPU smoke test that CI runs
(tests/test_bench_smoke.py); on a 2-core CPU it finishes in about a minute. RIS_MODEL_RUNTIME /
RIS_MODEL_PRECISION / RIS_MODEL_DEVICE apply to part A and (RIS_MODEL_RUNTIME, RIS_MODEL_PRECISION) to the
served model.

On the lent GPU machine (bare, no network, its own Python 3.12 with PyTorch): ``bench/gpu_check.sh``
installs the wheels fetched beforehand with ``bench/gpu_check.sh fetch`` and runs this script; see
bench/README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import base_env, batching, load_test, query_photos, serve  # noqa: E402

from ingest.demo import encode, photos  # noqa: E402


@dataclass
class Plan:
    batches: list[int]
    concurrency: int
    seconds: float
    photos: int  # real photos for the fidelity check and the service's collection
    min_seconds: float  # timing per batch size (after one warm-up call)
    min_runs: int


def plan_from(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(batches=[1, 4], concurrency=4, seconds=3, photos=4, min_seconds=0.3, min_runs=1)
    return Plan(
        batches=[int(b) for b in args.batches.split(",") if b],
        concurrency=args.concurrency,
        seconds=args.seconds,
        photos=args.photos,
        min_seconds=3.0,
        min_runs=3,
    )


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        return (
            f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}, {total:.0f} GiB), CUDA {torch.version.cuda}, "
            f"torch {torch.__version__}"
        )
    from models.imaging import usable_cpus

    return f"CPU (no CUDA device): {platform.machine()}, {usable_cpus()} threads, torch {torch.__version__}"


def part_a(plan: Plan, settings, photo_bytes: list[bytes]) -> list[str]:
    """Both roles' embedders (the similarity ResNet-50 and the copy model, Meta's SSCD ResNet-50): throughput
    per batch size and fidelity to CPU fp32; returns the failures."""
    print("## A. Embedder alone\n")
    return [failure for role in ("similarity", "copy") for failure in _embedder_alone(plan, settings, photo_bytes, role)]


def _embedder_alone(plan: Plan, settings, photo_bytes: list[bytes], role: str) -> list[str]:
    import torch
    from runtimes import LIMITS, timed

    from models.pipeline import prepare_image
    from models.runtime import FIDELITY_FLOOR
    from models.store import load_embedder

    started = time.perf_counter()
    embedder = load_embedder(settings, role=role)
    load_s = time.perf_counter() - started
    cuda = embedder.runtime.choice.device == "cuda"
    crop = embedder.preprocessing.crop
    print(f"### {role}: {embedder.device_name}, {embedder.info.model_id}, loaded in {load_s:.1f} s\n")
    print("| batch | images/s | ms per batch | peak GPU memory MiB |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in plan.batches:
        pixels = np.random.default_rng(batch).integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(lambda p=pixels: embedder.embed(p), plan.min_seconds, plan.min_runs)
        memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else "-"
        print(f"| {batch} | {batch / seconds:.1f} | {seconds * 1000:.1f} | {memory} |")

    reference = load_embedder(settings.but(model={"device": "cpu", "runtime": "torch", "precision": "fp32"}), role=role)
    pixels = np.stack([prepare_image(data, LIMITS, embedder.preprocessing, None).pixels for data in photo_bytes])
    cosines = np.sum(embedder.embed(pixels) * reference.embed(pixels), axis=1)
    worst = float(cosines.min())
    verdict = "ok" if worst >= FIDELITY_FLOOR else "FAIL"
    print(
        f"\nfidelity ({embedder.runtime.choice.label} vs torch-fp32 on the CPU, {len(photo_bytes)} real photos): "
        f"min cosine {worst:.5f}, mean {float(cosines.mean()):.5f} (floor {FIDELITY_FLOOR}): {verdict}\n"
    )
    if verdict != "ok":
        return [f"{role} fidelity: min cosine {worst:.5f} < {FIDELITY_FLOOR}"]
    return []


def part_b(plan: Plan, work: Path, photo_bytes: list[bytes]) -> list[str]:
    """The service with adaptive batching on, then off, under concurrent uploads; returns the failures."""
    log = work / "service.log"
    uploads = query_photos()
    print(
        f"## B. Through the service: POST /api/search, {plan.concurrency} concurrent uploaders, "
        f"{plan.seconds:g} s each (log: {log})\n"
    )
    print("| embedder batching | cold start s | requests/s | p50 ms | p99 ms | ok | errors (503) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    failures: list[str] = []
    rps: dict[str, float] = {}
    for name, flag in (("on", "true"), ("off", "false")):
        try:
            with serve(base_env(work / f"batching-{flag}", **batching(flag == "true")), log) as (url, cold):
                with httpx.Client(base_url=url, timeout=120) as http:
                    for i, data in enumerate(photo_bytes):
                        http.post("/api/images", files={"file": (f"{i}.jpg", data)}).raise_for_status()
                r = asyncio.run(load_test(url, uploads, plan.concurrency, plan.seconds))
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"| {name} | - | - | - | - | - | failed: {exc} |")
            failures.append(f"batching {name}: {exc}")
            continue
        rps[name] = r["rps"]
        print(
            f"| {name} | {cold:.1f} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['ok']} | "
            f"{r['errors']} ({r['503']}) |"
        )
        if r["errors"] or not r["ok"]:
            failures.append(f"batching {name}: {r['errors']} errors, {r['ok']} ok; see {log}")
    if rps.get("off"):
        print(f"\nbatching on / off throughput: {rps.get('on', 0.0) / rps['off']:.2f}x\n")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--photos", type=int, default=16, help="real photos for fidelity and the collection")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run for CI: batches 1,4, 4 uploaders, 3 s")
    parser.add_argument("--skip-service", action="store_true", help="part A only")
    parser.add_argument("--workdir", type=Path, default=None, help="model store, data and service.log (default: a temp dir)")
    args = parser.parse_args()
    plan = plan_from(args)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ris-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    # One model store for part A and both services: the services find the model part A imported.
    os.environ.setdefault("BENTOML_HOME", str(work / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("RIS_MODEL_RESNET50_WEIGHTS", "random")
    # Both models of the design card on the GPU: the copy model is Meta's SSCD ResNet-50 (random-init unless
    # RIS_MODEL_SSCD_WEIGHTS names real ones), which the services of part B batch beside ResNet-50.
    os.environ.setdefault("RIS_MODEL_COPY_NAME", "sscd-resnet50")
    os.environ.setdefault("RIS_MODEL_SSCD_WEIGHTS", "random")
    from bento.core.config import Settings

    settings = Settings(
        data_dir=work / "data",
        model={
            "name": "resnet50",
            "resnet50_weights": os.environ["RIS_MODEL_RESNET50_WEIGHTS"],
            "copy_name": os.environ["RIS_MODEL_COPY_NAME"],
            "sscd_weights": os.environ["RIS_MODEL_SSCD_WEIGHTS"],
        },
    )
    photo_bytes = [encode(image) for _, _, image in photos()][: plan.photos]

    print(f"# GPU check: ResNet-50 (weights: {settings.model.resnet50_weights}) and SSCD ResNet-50 (weights: {settings.model.sscd_weights})\n")
    print(f"device: {device_line()}\n")
    started = time.perf_counter()
    failures = part_a(plan, settings, photo_bytes)
    if not args.skip_service:
        failures += part_b(plan, work, photo_bytes)
    print(f"total {time.perf_counter() - started:.0f} s")
    if failures:
        print("\nFAIL:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    print("\nPASS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
