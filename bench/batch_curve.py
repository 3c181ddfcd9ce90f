"""Batch size vs latency/throughput of the embedder on this machine (justifies the batching settings).

``python bench/batch_curve.py [--model resnet50|efficientnet-lite0] [--runtime auto] [--precision auto]
[--sizes 1,2,4,8,16,32,64] [--calibration-dir DIR]``
ResNet-50 uses random-init weights when pretrained ones cannot be had: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bento.core.config import Settings
from models.store import load_embedder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet50", choices=["efficientnet-lite0", "resnet50"])
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"])
    parser.add_argument("--calibration-dir", type=Path, default=None, help="photos for --precision int8")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    weights = {"resnet50_weights": "random"} if args.model == "resnet50" else {}
    embedder = load_embedder(
        Settings(
            model={
                "name": args.model, "runtime": args.runtime, "precision": args.precision,
                "int8_calibration_dir": args.calibration_dir, **weights,
            }
        )
    )
    embedder.warm_up()
    crop = embedder.preprocessing.crop
    print(f"model {embedder.info.model_id} on {embedder.device_name}")
    print(f"{'batch':>6} {'latency ms (median)':>20} {'images/s':>10}")
    for size in (int(s) for s in args.sizes.split(",")):
        pixels = np.random.default_rng(0).integers(0, 256, (size, crop, crop, 3), dtype=np.uint8)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            embedder.embed(pixels)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"{size:>6} {median * 1000:>20.1f} {size / median:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
