"""End-to-end ingest rate: `python -m ingest` over a folder of ImageNet-sized JPEGs (decode, thumbnail,
embed, image store, Milvus Lite), per runtime, side by side in one run.

``python bench/ingest_rate.py [--images 512] [--runtimes openvino-bf16,openvino-int8,torch-fp32]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.demo import grainy_jpeg, photos  # noqa: E402


def build_folder(root: Path, count: int) -> Path:
    """ImageNet-style class folders of distinct ~500x375 JPEGs (flips, crops and grain of real photos)."""
    from PIL import Image

    images = [(label, image) for label, _, image in photos()]
    for i in range(count):
        label, image = images[i % len(images)]
        variant = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (i // len(images)) % 2 else image
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(grainy_jpeg(variant, (500, 375), seed=i))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--runtimes", default="torch-fp32,openvino-bf16,openvino-int8")
    parser.add_argument("--model", default="resnet50")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ris-ingest-bench-"))
    folder = build_folder(work / "photos", args.images)
    calibration = build_folder(work / "calibration", 64)
    env_base = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
    env_base.update(
        BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=os.environ.get("BENTOML_HOME", str(work / "bentoml")),
        RIS_MODEL_NAME=args.model, RIS_MODEL_RESNET50_WEIGHTS=os.environ.get("RIS_MODEL_RESNET50_WEIGHTS", "random"),
        RIS_MODEL_INT8_CALIBRATION_DIR=str(calibration),
    )
    print(f"## Ingest job: {args.images} JPEGs of 500x375 (~{sum(p.stat().st_size for p in folder.rglob('*.jpg')) // args.images // 1000} KB), "
          f"{args.model}, Milvus Lite + local store, {os.cpu_count()} CPUs")
    print("| runtime | images/s | seconds | ingested |")
    print("| --- | ---: | ---: | ---: |")
    base = None
    for label in args.runtimes.split(","):
        runtime, precision = label.split("-")
        env = {
            **env_base, "RIS_DATA_DIR": str(work / f"data-{label}"), "RIS_MODEL_RUNTIME": runtime,
            "RIS_MODEL_PRECISION": precision,
        }
        done = subprocess.run(
            [sys.executable, "-m", "ingest", str(folder), "--no-progress", "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
        )
        if done.returncode != 0:
            print(f"| {label} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | |")
            continue
        report = json.loads(done.stdout)
        rate = report["ingested"] / report["seconds"]
        base = rate if base is None else base
        print(f"| {label} | {rate:.0f} ({rate / base:.1f}x) | {report['seconds']:.1f} | {report['ingested']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
