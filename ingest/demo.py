"""A demo image set in ImageNet-style class folders, built offline.

Real photos come from scikit-image's bundled sample data (no download); generated images (shapes,
gradients, text-like noise) fill out the set. ``variants`` adds edited copies of each photo (crop,
mirror, colour) to its class, so searches in the demo have several sensible answers.

``python -m ingest.demo OUT_DIR [--variants N]``
"""

from __future__ import annotations

import argparse
import io
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

logger = logging.getLogger(__name__)

# label -> skimage.data loaders (only those bundled in the wheel; others would need a download)
PHOTOS: dict[str, list[str]] = {
    "person": ["astronaut", "camera"],
    "cat": ["chelsea"],
    "coffee": ["coffee"],
    "rocket": ["rocket"],
    "motorcycle": ["stereo_motorcycle:0", "stereo_motorcycle:1"],
    "space": ["hubble_deep_field", "moon"],
    "microscopy": ["immunohistochemistry", "cell"],
    "retina": ["retina"],
    "texture": ["brick", "grass", "gravel"],
    "coins": ["coins"],
    "clock": ["clock"],
    "horse": ["horse"],
    "document": ["page", "text"],
}


def load_photo(spec: str) -> Image.Image:
    from skimage import data

    name, _, index = spec.partition(":")
    array = getattr(data, name)()
    if index:
        array = array[int(index)]
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def photos() -> Iterator[tuple[str, str, Image.Image]]:
    """(label, name, image) for every bundled real photo."""
    for label, specs in PHOTOS.items():
        for spec in specs:
            yield label, spec.replace(":", "-"), load_photo(spec)


def near_duplicate(image: Image.Image, seed: int) -> bytes:
    """A cropped, resized, colour-shifted, re-encoded copy: what a user's query photo looks like."""
    rng = random.Random(seed)
    w, h = image.size
    fx, fy = rng.uniform(0.80, 0.92), rng.uniform(0.80, 0.92)
    left, top = rng.uniform(0, 1 - fx) * w, rng.uniform(0, 1 - fy) * h
    copy = image.crop((int(left), int(top), int(left + fx * w), int(top + fy * h)))
    scale = rng.uniform(0.6, 1.2)
    copy = copy.resize((max(32, int(copy.width * scale)), max(32, int(copy.height * scale))), Image.Resampling.BICUBIC)
    copy = ImageEnhance.Brightness(copy).enhance(rng.uniform(0.85, 1.15))
    copy = ImageEnhance.Color(copy).enhance(rng.uniform(0.8, 1.2))
    return encode(copy, "JPEG", quality=rng.randint(55, 80))


def grainy_jpeg(image: Image.Image, size: tuple[int, int], seed: int, grain: float = 5.0) -> bytes:
    """A photo scaled and centre-cropped to ``size`` with camera-like grain, as JPEG q90: the fine texture
    real photos have and reduced-scale decoding could lose (benchmarks and fidelity tests use it)."""
    scale = max(size[0] / image.width, size[1] / image.height)
    big = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    left, top = (big.width - size[0]) // 2, (big.height - size[1]) // 2
    big = big.crop((left, top, left + size[0], top + size[1]))
    noise = np.random.default_rng(seed).normal(0, grain, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(big, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} | params if fmt == "JPEG" else params))
    return out.getvalue()


def _shapes(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (320, 240), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randint(0, 280), rng.randint(0, 200)
        box = (x0, y0, x0 + rng.randint(20, 120), y0 + rng.randint(20, 120))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def _gradient(rng: random.Random) -> Image.Image:
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
    base = (a * x / 320 + b * y / 240 + 2) / 4
    channels = [np.clip(base * rng.uniform(0.3, 1) * 255 + rng.uniform(0, 80), 0, 255) for _ in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def _stripes(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    step = rng.randint(6, 30)
    colour = tuple(rng.randint(0, 200) for _ in range(3))
    for i in range(-240, 320, step):
        draw.line((i, 0, i + 240 * rng.choice([0, 1]), 240), fill=colour, width=max(1, step // 3))
    return image


GENERATED: dict[str, Callable[[random.Random], Image.Image]] = {"shapes": _shapes, "gradient": _gradient, "stripes": _stripes}


def _variants(image: Image.Image, count: int, rng: random.Random) -> Iterator[Image.Image]:
    edits = [
        lambda im: ImageOps.mirror(im),
        lambda im: im.crop((im.width // 8, im.height // 8, im.width * 7 // 8, im.height * 7 // 8)),
        lambda im: ImageEnhance.Color(im).enhance(0.4),
        lambda im: im.rotate(8, expand=False, fillcolor=(255, 255, 255)),
    ]
    for edit in rng.sample(edits, k=min(count, len(edits))):
        yield edit(image)


def build_demo_set(out: Path, variants: int = 2, generated_per_class: int = 8, seed: int = 7) -> int:
    """Write the demo set into ``out`` (idempotent: same bytes every time). Returns the file count."""
    rng = random.Random(seed)
    count = 0

    def write(label: str, name: str, data: bytes, suffix: str) -> None:
        nonlocal count
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}{suffix}").write_bytes(data)
        count += 1

    for label, name, image in photos():
        write(label, name, encode(image), ".jpg")
        for i, variant in enumerate(_variants(image, variants, rng)):
            write(label, f"{name}-variant{i}", encode(variant), ".jpg")
    for label, make in GENERATED.items():
        for i in range(generated_per_class):
            write(label, f"{label}-{i:02d}", encode(make(rng), "PNG"), ".png")
    logger.info("Demo set: %d images in %s", count, out)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ingest.demo", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--variants", type=int, default=2, help="edited copies per photo (0-4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_demo_set(args.out, variants=args.variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
