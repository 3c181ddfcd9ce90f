"""Embedding speed on this machine, side by side in one run: runtime x batch size, JPEG decode, and the
end-to-end pipeline (JPEG bytes -> unit vector, decode workers overlapping inference) with per-image
fidelity (cosine to PyTorch eager fp32) and near-duplicate recall@1.

``python bench/runtimes.py [--model resnet50] [--batches 1,8,32] [--runtimes ...]``

ResNet-50 runs with random-init weights unless RIS_MODEL_RESNET50_WEIGHTS names real ones (ImageNet weights
cannot be downloaded on our CI machines); speed does not depend on the weight values. Fidelity of a
random-init network is a harsher test than of a trained one for bf16 (no trained feature scale) and
a fair one for int8 calibration; EfficientNet-Lite0 (`--model efficientnet-lite0`) has genuine weights.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bento.core.config import Settings
from ingest.demo import grainy_jpeg, near_duplicate, photos
from models.embedding import ImageEmbedder
from models.imaging import DecodeLimits, usable_cpus
from models.pipeline import prepare_image
from models.runtime import RuntimeUnavailable
from models.store import load_embedder

LIMITS = DecodeLimits(10**9, 10**9)
RUNTIMES = ("torch-fp32", "torch-bf16", "openvino-fp32", "openvino-bf16", "openvino-int8")


@dataclass
class PhotoSet:
    imagenet: list[bytes]  # ~500x375 JPEG q90, as ImageNet photos
    hd: list[bytes]  # 1920x1080 JPEG q90
    originals: list[bytes]  # for recall: originals and their near-duplicate queries
    queries: list[bytes]
    calibration_dir: Path


def make_photos(workdir: Path) -> PhotoSet:
    images = [image for _, _, image in photos()]
    calibration_dir = workdir / "calibration"
    calibration_dir.mkdir(parents=True, exist_ok=True)
    imagenet, hd = [], []
    for i, image in enumerate(images):
        imagenet.append(grainy_jpeg(image, (500, 375), i))
        hd.append(grainy_jpeg(image, (1920, 1080), i))
        # int8 calibration: other crops of the photos than the ones measured (a held-out split is in the tests).
        (calibration_dir / f"{i}.jpg").write_bytes(grainy_jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (640, 480), 100 + i))
    originals = [grainy_jpeg(image, (500, 375), 200 + i) for i, image in enumerate(images)]
    queries = [near_duplicate(Image.open(io.BytesIO(data)).convert("RGB"), seed=i) for i, data in enumerate(originals)]
    return PhotoSet(imagenet=imagenet, hd=hd, originals=originals, queries=queries, calibration_dir=calibration_dir)


def load(model: str, label: str, calibration_dir: Path) -> ImageEmbedder:
    runtime, precision = label.split("-")
    settings = Settings(
        data_dir=Path("unused"),
        model={
            "name": model,
            "resnet50_weights": os.environ.get("RIS_MODEL_RESNET50_WEIGHTS", "random"),
            "runtime": runtime,
            "precision": precision,
            "int8_calibration_dir": calibration_dir,
        },
    )
    return load_embedder(settings)


def timed(fn: Callable[[], object], min_seconds: float = 3.0, min_runs: int = 2) -> float:
    """Seconds per call: one warm-up call, then repeat until both minimums are met."""
    fn()
    runs, started = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - started < min_seconds:
        fn()
        runs += 1
    return (time.perf_counter() - started) / runs


def model_throughput(embedder: ImageEmbedder, batch: int) -> float:
    crop = embedder.preprocessing.crop
    pixels = np.random.default_rng(0).integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
    return batch / timed(lambda: embedder.embed(pixels))


def decode_throughput(blobs: list[bytes], resize: int, draft_scale: float, threads: int) -> float:
    from models.preprocess import Preprocessing

    pre = Preprocessing(resize=resize, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with ThreadPoolExecutor(threads) as pool:
        def run() -> None:
            list(pool.map(lambda b: prepare_image(b, LIMITS, pre, None, draft_scale), blobs))

        return len(blobs) / timed(run)


def _batches(blobs: list[bytes], size: int) -> Iterator[list[bytes]]:
    for i in range(0, len(blobs), size):
        yield blobs[i : i + size]


def pipeline_vectors(
    embedder: ImageEmbedder, blobs: list[bytes], batch: int, workers: int, draft_scale: float
) -> np.ndarray:
    """JPEG bytes -> vectors as the ingest job runs it: decode threads prepare the next batches while
    the runtime embeds the current one (bounded look-ahead)."""
    pre = embedder.preprocessing

    def prepare(chunk: list[bytes]) -> np.ndarray:
        return np.stack([prepare_image(b, LIMITS, pre, None, draft_scale).pixels for b in chunk])

    out = []
    with ThreadPoolExecutor(workers) as pool:
        for pixels in pool.map(prepare, _batches(blobs, batch)):  # map submits ahead: decode overlaps embed
            out.append(embedder.embed(pixels))
    return np.concatenate(out)


def recall_at_1(embedder: ImageEmbedder, originals: list[bytes], queries: list[bytes], draft_scale: float) -> float:
    o = pipeline_vectors(embedder, originals, 32, 2, draft_scale)
    q = pipeline_vectors(embedder, queries, 32, 2, draft_scale)
    return float(np.mean((q @ o.T).argmax(axis=1) == np.arange(len(originals))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "efficientnet-lite0"])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--images", type=int, default=128, help="images per end-to-end run (photos repeat)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    labels = args.runtimes.split(",")
    threads = usable_cpus()
    workdir = Path(tempfile.mkdtemp(prefix="ris-bench-"))
    os.environ.setdefault("BENTOML_HOME", str(workdir / "bentoml"))
    photo_set = make_photos(workdir)
    print(f"# Embedding runtimes: {args.model}, {threads} CPU threads, {os.uname().machine}\n")

    print("## Decode + preprocess (JPEG bytes -> 224x224 pixels), images/s")
    print("| photos | threads | full decode | draft decode (>= 2x resize) | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, blobs in (("500x375 ~ImageNet", photo_set.imagenet), ("1920x1080", photo_set.hd)):
        for t in sorted({1, threads}):
            full = decode_throughput(blobs, 232, 0.0, t)
            draft = decode_throughput(blobs, 232, 2.0, t)
            print(f"| {name} | {t} | {full:.0f} | {draft:.0f} | {draft / full:.2f}x |")

    embedders: dict[str, ImageEmbedder] = {}
    load_s: dict[str, float] = {}
    for label in labels:
        started = time.perf_counter()
        try:
            embedders[label] = load(args.model, label, photo_set.calibration_dir)
        except RuntimeUnavailable as exc:
            print(f"\n{label}: not available here: {exc.message}")
            continue
        load_s[label] = time.perf_counter() - started

    print("\n## Model throughput (pixels -> vectors), images/s, and ratio to torch-fp32 at the same batch")
    print("| runtime | build s | " + " | ".join(f"bs{b}" for b in batches) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in batches) + " |")
    base: dict[int, float] = {}
    for label, embedder in embedders.items():
        cells = []
        for b in batches:
            rate = model_throughput(embedder, b)
            if label == "torch-fp32":
                base[b] = rate
            ratio = f" ({rate / base[b]:.1f}x)" if b in base and label != "torch-fp32" else ""
            cells.append(f"{rate:.0f}{ratio}")
        print(f"| {label} | {load_s[label]:.1f} | " + " | ".join(cells) + " |")

    reference = embedders.get("torch-fp32")
    print("\n## End to end: JPEG bytes -> unit vector (batch 32, decode threads overlapping inference)")
    print("| runtime | photos | images/s | vs torch-fp32 | min cosine to fp32 | mean cosine | near-dup recall@1 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, blobs in (("500x375", photo_set.imagenet), ("1920x1080", photo_set.hd)):
        work = (blobs * (args.images // len(blobs) + 1))[: args.images]
        exact = pipeline_vectors(reference, blobs, 32, threads, 0.0) if reference else None
        base_rate = None
        for label, embedder in embedders.items():
            draft = 0.0 if label == "torch-fp32" else 2.0  # the reference decodes fully; fast paths draft
            rate = args.images / timed(lambda e=embedder, d=draft, w=work: pipeline_vectors(e, w, 32, threads, d), 1.0, 1)
            base_rate = rate if label == "torch-fp32" else base_rate
            vectors = pipeline_vectors(embedder, blobs, 32, threads, draft)
            cos = np.sum(vectors * exact, axis=1) if exact is not None else np.array([np.nan])
            recall = recall_at_1(embedder, photo_set.originals, photo_set.queries, draft) if name == "500x375" else None
            print(
                f"| {label}{' + draft' if draft else ''} | {name} | {rate:.0f} | "
                f"{f'{rate / base_rate:.1f}x' if base_rate else '-'} | {cos.min():.4f} | {cos.mean():.4f} | "
                f"{f'{recall:.2f}' if recall is not None else '-'} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
