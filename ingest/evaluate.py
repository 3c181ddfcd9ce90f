"""`python -m ingest.evaluate FOLDER`: how well does search find the original of an edited copy, on your photos?

From the images of FOLDER it makes deterministic near-duplicate queries (crops of several sizes, thumbnails,
JPEG re-compression, colour changes, small and large rotations, a flip, greyscale, a caption bar, a
perspective change), searches each one, and reports recall@1, recall@5 and mAP overall and per transform,
with the score distributions of true and false matches (what a "same image" threshold can rely on).
The queries never enter any collection.

- In-process (default): the originals (and, with ``--siblings``, hard negatives: other crops of the same
  photo stored beside it, which the original must outrank) go into a temporary collection (a Milvus Lite
  file in a temp dir) embedded with the model the settings choose; your collection is not touched.
- ``--service-url URL``: queries a running service, whose collection must already hold the originals (the
  ids are content hashes, so it is checked); add ``--api-key`` where keys are configured.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from pydantic import BaseModel, Field

from bento.adapters.assembly import open_catalog
from bento.core.cli import UsageError, run_tool
from bento.core.config import LimitsSettings, Settings, get_settings
from bento.core.errors import BackendUnavailable, SearchError
from bento.core.ids import content_hash
from bento.domain.catalog import Catalog, NewImage
from bento.domain.ports import Embedding
from bento.domain.schemas import SearchMode, SearchOptions
from ingest.job import scan_folder
from models.imaging import DecodeLimits, decode_image

logger = logging.getLogger(__name__)
TOP_K = 10
# The precision the suggested thresholds must reach: "same image" is shown as a fact, "near duplicate" as a
# strong hint.
SAME_IMAGE_PRECISION = 0.99
NEAR_DUPLICATE_PRECISION = 0.95
Transform = Callable[[Image.Image, random.Random], Image.Image]


def _crop(fraction: float) -> Transform:
    def crop(image: Image.Image, rng: random.Random) -> Image.Image:
        w, h = image.size
        cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return image.crop((left, top, left + cw, top + ch))

    return crop


def _thumbnail(side: int) -> Transform:
    def thumbnail(image: Image.Image, rng: random.Random) -> Image.Image:
        copy = image.copy()
        copy.thumbnail((side, side), Image.Resampling.LANCZOS)
        return copy

    return thumbnail


def _colour(image: Image.Image, rng: random.Random) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))


def _rotate(degrees: float) -> Transform:
    def rotate(image: Image.Image, rng: random.Random) -> Image.Image:
        return image.rotate(rng.choice((-1, 1)) * degrees, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))

    return rotate


def _caption(image: Image.Image, rng: random.Random) -> Image.Image:
    """A screenshot-like copy: a border and a caption bar with text."""
    w, h = image.size
    bar = max(16, h // 6)
    canvas = Image.new("RGB", (w + 2 * (w // 20), h + 2 * bar), (250, 250, 250))
    canvas.paste(image, (w // 20, bar))
    draw = ImageDraw.Draw(canvas)
    draw.text((w // 20, bar // 4), f"photo {rng.randint(100, 999)} - shared with friends", fill=(20, 20, 20))
    draw.text((w // 20, h + bar + bar // 4), "12 likes  3 comments", fill=(90, 90, 90))
    return canvas


def _perspective(image: Image.Image, rng: random.Random) -> Image.Image:
    w, h = image.size
    dx, dy = w * rng.uniform(0.04, 0.1), h * rng.uniform(0.04, 0.1)
    # Coefficients mapping output to input: a mild keystone, as a photo of a screen or a print.
    source = [(dx, dy), (w - dx / 2, 0), (w, h), (0, h - dy / 2)]
    target = [(0, 0), (w, 0), (w, h), (0, h)]
    matrix = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        matrix.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        matrix.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    coefficients = np.linalg.solve(np.array(matrix, dtype=np.float64), np.array(source, dtype=np.float64).reshape(8))
    return image.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coefficients), Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class Edit:
    transform: Transform
    quality: int = 90  # the JPEG quality the query is saved with


EDITS: dict[str, Edit] = {
    "crop-80": Edit(_crop(0.8)),
    "crop-60": Edit(_crop(0.6)),
    "crop-60-q40": Edit(_crop(0.6), 40),
    "crop-40": Edit(_crop(0.4)),
    "thumb-256": Edit(_thumbnail(256)),
    "thumb-128": Edit(_thumbnail(128)),
    "thumb-64": Edit(_thumbnail(64)),
    "jpeg-q40": Edit(lambda image, rng: image, 40),
    "jpeg-q15": Edit(lambda image, rng: image, 15),
    "colour": Edit(_colour),
    "rotate-5": Edit(_rotate(5)),
    "rotate-90": Edit(lambda image, rng: image.transpose(rng.choice((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270)))),
    "flip": Edit(lambda image, rng: ImageOps.mirror(image)),
    "greyscale": Edit(lambda image, rng: ImageOps.grayscale(image).convert("RGB")),
    "caption": Edit(_caption),
    "perspective": Edit(_perspective),
}


def make_query(image: Image.Image, name: str, seed: int, index: int) -> bytes:
    """The query for one original and one edit: the same bytes for the same (seed, original, edit)."""
    edit = EDITS[name]
    rng = random.Random(f"{seed}:{index}:{name}")
    out = io.BytesIO()
    edit.transform(image, rng).convert("RGB").save(out, format="JPEG", quality=edit.quality)
    return out.getvalue()


def siblings(image: Image.Image) -> list[bytes]:
    """Hard negatives: other versions of the same photo a real collection keeps beside it (two quarters)."""
    w, h = image.size
    out = []
    for box in ((0, 0, w // 2, h // 2), (w // 2, h // 2, w, h)):
        buffer = io.BytesIO()
        image.crop(box).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# --- metrics ---------------------------------------------------------------------------------------


class Distribution(BaseModel):
    count: int
    p5: float | None
    p50: float | None
    p95: float | None


def distribution(values: Sequence[float]) -> Distribution:
    if not values:
        return Distribution(count=0, p5=None, p50=None, p95=None)
    ordered = np.asarray(sorted(values))
    p5, p50, p95 = (round(float(np.percentile(ordered, q)), 4) for q in (5, 50, 95))
    return Distribution(count=len(values), p5=p5, p50=p50, p95=p95)


class Row(BaseModel):
    transform: str
    queries: int
    recall_at_1: float
    recall_at_5: float
    same_photo_at_1: float = Field(0.0, description="The first hit is the original or one of its siblings (another crop of the same photo stored beside it).")
    map: float = 0.0  # one relevant image per query: AP = 1/rank within the top 10
    true_scores: Distribution
    false_scores: Distribution  # the best-scoring wrong hit of each query


class Threshold(BaseModel):
    """A score threshold derived from the hits' scores, with what it gives on this evaluation."""

    score: float
    precision: float = Field(description="Of all hits scoring at least this, the share that is the query's original.")
    recall: float = Field(description="Of all queries, the share whose original scores at least this.")


class SuggestedThresholds(BaseModel):
    same_image: Threshold | None = Field(None, description=f"The lowest score with precision >= {SAME_IMAGE_PRECISION}.")
    near_duplicate: Threshold | None = Field(None, description=f"The lowest score with precision >= {NEAR_DUPLICATE_PRECISION}.")


class Report(BaseModel):
    folder: str
    model: str
    mode: SearchMode = "both"
    originals: int
    siblings: int
    top_k: int
    seconds: float
    overall: Row
    per_transform: list[Row]
    thresholds: SuggestedThresholds = Field(default_factory=SuggestedThresholds)
    missing: list[str] = []  # originals the collection does not hold (service mode)

    def table(self) -> str:
        lines = [
            f"Evaluation of {self.folder} with {self.model} (mode {self.mode}): {self.originals} originals"
            + (f", {self.siblings} hard negatives (siblings)" if self.siblings else "")
            + f", {self.overall.queries} queries, {self.seconds:.1f} s",
            "",
            "| transform | queries | recall@1 | recall@5 | same photo @1 | mAP | true match score p5 / p50 | best false score p50 / p95 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in [*self.per_transform, self.overall]:
            true, false = row.true_scores, row.false_scores
            lines.append(
                f"| {'**overall**' if row is self.overall else row.transform} | {row.queries} | {row.recall_at_1:.3f} | "
                f"{row.recall_at_5:.3f} | {row.same_photo_at_1:.3f} | {row.map:.3f} | {_fmt(true.p5)} / {_fmt(true.p50)} | "
                f"{_fmt(false.p50)} / {_fmt(false.p95)} |"
            )
        for name, found in (("same image", self.thresholds.same_image), ("near duplicate", self.thresholds.near_duplicate)):
            if found is not None:
                lines.append(
                    f"\nSuggested {name} threshold: score >= {found.score:.3f} (precision {found.precision:.3f}, "
                    f"recall {found.recall:.3f} over every hit of every query)"
                )
        if self.missing:
            lines.append(f"\n{len(self.missing)} originals are not in the collection and were skipped.")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass
class _Outcome:
    rank: int | None  # 1-based rank of the original within the top k
    same_photo: bool  # the first hit is the original or a sibling of it
    true_score: float | None
    false_score: float | None
    false_scores: list[float] = field(default_factory=list)  # every wrong hit's score (threshold precision)


@dataclass
class _Tally:
    outcomes: dict[str, list[_Outcome]] = field(default_factory=dict)

    def add(self, transform: str, outcome: _Outcome) -> None:
        self.outcomes.setdefault(transform, []).append(outcome)

    @staticmethod
    def row(transform: str, outcomes: list[_Outcome]) -> Row:
        n = max(1, len(outcomes))
        return Row(
            transform=transform,
            queries=len(outcomes),
            recall_at_1=round(sum(o.rank == 1 for o in outcomes) / n, 4),
            recall_at_5=round(sum(o.rank is not None and o.rank <= 5 for o in outcomes) / n, 4),
            same_photo_at_1=round(sum(o.same_photo for o in outcomes) / n, 4),
            map=round(sum(1 / o.rank for o in outcomes if o.rank) / n, 4),
            true_scores=distribution([o.true_score for o in outcomes if o.true_score is not None]),
            false_scores=distribution([o.false_score for o in outcomes if o.false_score is not None]),
        )


def judge(hits: Sequence[tuple[str, float]], original: str, family: frozenset[str] = frozenset()) -> _Outcome:
    """Where the original stands among (id, score) hits, best first; ``family``: its siblings' ids (a first
    hit among them still finds the same photo). Siblings are neither true nor false matches for the scores."""
    rank = next((i + 1 for i, (image_id, _) in enumerate(hits) if image_id == original), None)
    true = hits[rank - 1][1] if rank else None
    false_scores = [score for image_id, score in hits if image_id != original and image_id not in family]
    same_photo = bool(hits) and (hits[0][0] == original or hits[0][0] in family)
    return _Outcome(rank, same_photo, true, false_scores[0] if false_scores else None, false_scores)



def suggest_threshold(outcomes: Sequence[_Outcome], precision: float) -> Threshold | None:
    """The lowest score from which at least ``precision`` of all hits (top k of every query) are originals."""
    true = np.asarray(sorted((o.true_score for o in outcomes if o.true_score is not None), reverse=True))
    false = np.asarray(sorted((s for o in outcomes for s in o.false_scores), reverse=True))
    best: Threshold | None = None
    for score in true:
        kept_true = int(np.searchsorted(-true, -score, side="right"))
        kept_false = int(np.searchsorted(-false, -score, side="right"))
        share = kept_true / (kept_true + kept_false)
        if share >= precision:
            best = Threshold(score=round(float(score), 4), precision=round(share, 4), recall=round(kept_true / len(outcomes), 4))
    return best


# --- running it ------------------------------------------------------------------------------------

Searcher = Callable[[bytes], list[tuple[str, float]]]


def load_originals(folder: Path, limit: int) -> list[tuple[str, bytes, Image.Image]]:
    """(relative path, bytes, RGB image) of up to ``limit`` images the service would take, spread over the folder."""
    defaults = LimitsSettings()
    limits = DecodeLimits(defaults.max_upload_bytes, defaults.max_image_pixels, defaults.max_decoded_bytes)
    paths = [path for path, _ in scan_folder(folder)]
    step = max(1, len(paths) // limit) if limit else 1
    chosen = []
    for path in paths[::step]:
        if limit and len(chosen) >= limit:
            break
        data = path.read_bytes()
        try:  # the product's own decoder: the same formats, limits and orientation as an upload
            image = decode_image(data, limits).image
        except SearchError as exc:
            logger.info("skipping %s: %s", path, exc.message)
            continue
        chosen.append((str(path.relative_to(folder)), data, image))
    return chosen


def run(
    originals: list[tuple[str, bytes, Image.Image]],
    search: Searcher,
    transforms: Sequence[str],
    seed: int,
    with_siblings: bool = False,
) -> tuple[list[Row], Row, SuggestedThresholds]:
    tally = _Tally()
    for index, (_, data, image) in enumerate(originals):
        original = content_hash(data)
        family = frozenset(content_hash(blob) for blob in siblings(image)) if with_siblings else frozenset()
        for name in transforms:
            tally.add(name, judge(search(make_query(image, name, seed, index)), original, family))
    per_transform = [tally.row(name, tally.outcomes.get(name, [])) for name in transforms]
    everything = [o for name in transforms for o in tally.outcomes.get(name, [])]
    overall = tally.row("overall", everything)
    thresholds = SuggestedThresholds(
        same_image=suggest_threshold(everything, SAME_IMAGE_PRECISION),
        near_duplicate=suggest_threshold(everything, NEAR_DUPLICATE_PRECISION),
    )
    return per_transform, overall, thresholds


def in_process(
    settings: Settings, embedding: Embedding, originals: list[tuple[str, bytes, Image.Image]], with_siblings: bool
) -> tuple[Catalog, int]:
    """A temporary collection with the originals (and their siblings); returns it and the sibling count."""
    catalog = open_catalog(settings, embedding)
    images: list[NewImage] = []
    seen: set[str] = set()
    sibling_count = 0
    for source, data, image in originals:
        blobs = [(source, data)] + ([(f"{source}#sibling{i}", b) for i, b in enumerate(siblings(image))] if with_siblings else [])
        for name, blob in blobs:
            if content_hash(blob) in seen:
                continue
            seen.add(content_hash(blob))
            images.append(NewImage(catalog.prepare(blob, to_store=True), "", name))
            sibling_count += "#sibling" in name
    for start in range(0, len(images), 32):
        catalog.add_many(images[start : start + 32])
    catalog.vectors.flush()
    return catalog, sibling_count


def catalog_searcher(catalog: Catalog, mode: SearchMode = "both") -> Searcher:
    def search(query: bytes) -> list[tuple[str, float]]:
        result = catalog.search_image(query, SearchOptions(top_k=TOP_K, mode=mode))
        return [(hit.image.id, hit.score) for hit in result.hits]

    return search


def service_searcher(client: httpx.Client, mode: SearchMode = "both") -> Searcher:
    def search(query: bytes) -> list[tuple[str, float]]:
        form = {"top_k": str(TOP_K), "mode": mode}
        response = client.post("/api/search", files={"file": ("query.jpg", query, "image/jpeg")}, data=form)
        response.raise_for_status()
        return [(hit["id"], hit["score"]) for hit in response.json()["hits"]]

    return search


def evaluate_folder(
    folder: Path,
    *,
    limit: int = 200,
    transforms: Sequence[str] = tuple(EDITS),
    seed: int = 0,
    with_siblings: bool = False,
    settings: Settings | None = None,
    embedding: Embedding | None = None,
    mode: SearchMode = "both",
) -> Report:
    """In-process evaluation (the settings' models unless ``embedding`` is given) in a temporary collection.

    ``mode``: the product's answer (``both``: copies first, then similar images), the similarity model alone
    (``similar``), or the copy model's whole ranking (``copies``: every hit, whatever its score, so that the
    score distributions the copy thresholds are chosen from are seen whole)."""
    started = time.perf_counter()
    originals = load_originals(folder, limit)
    if not originals:
        raise SearchError(f"No images Pillow can read in {folder}.")
    base = settings or get_settings()
    if embedding is None:
        from models.store import load_embedders

        embedding = load_embedders(base)
    if mode == "copies":
        base = base.model_copy(update={"verdict": base.verdict.model_copy(update={"near_duplicate": -1.0})})
    with tempfile.TemporaryDirectory(prefix="ris-evaluate-") as work:
        temporary = base.model_copy(update={"data_dir": Path(work)}).but(
            milvus={"uri": str(Path(work) / "evaluate.db"), "collection": "evaluate"}, store={"dir": Path(work) / "images"}
        )
        catalog, sibling_count = in_process(temporary, embedding, originals, with_siblings)
        try:
            per_transform, overall, thresholds = run(originals, catalog_searcher(catalog, mode), transforms, seed, with_siblings)
        finally:
            catalog.close()
    return Report(
        folder=str(folder), model=_models(embedding, mode), mode=mode, originals=len(originals), siblings=sibling_count,
        top_k=TOP_K, seconds=round(time.perf_counter() - started, 2), overall=overall, per_transform=per_transform,
        thresholds=thresholds,
    )


def _models(embedding: Embedding, mode: SearchMode) -> str:
    copy = embedding.describe_copy()
    similarity = embedding.describe().info.model_id
    if mode == "similar" or copy is None:
        return similarity
    return copy.info.model_id if mode == "copies" else f"{copy.info.model_id} + {similarity}"


def evaluate_service(
    folder: Path, url: str, api_key: str = "", *, limit: int = 200, transforms: Sequence[str] = tuple(EDITS), seed: int = 0,
    mode: SearchMode = "both",
) -> Report:
    """Evaluation against a running service whose collection holds the originals."""
    started = time.perf_counter()
    originals = load_originals(folder, limit)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=120, headers=headers) as client:
        model = client.get("/api/model")
        model.raise_for_status()
        present, missing = [], []
        for item in originals:
            answer = client.get(f"/api/images/{content_hash(item[1])}/metadata")
            (present if answer.status_code == 200 else missing).append(item)
        per_transform, overall, thresholds = run(present, service_searcher(client, mode), transforms, seed)
    return Report(
        folder=str(folder), model=model.json()["info"]["model_id"], mode=mode, originals=len(present), siblings=0, top_k=TOP_K,
        seconds=round(time.perf_counter() - started, 2), overall=overall, per_transform=per_transform,
        thresholds=thresholds, missing=[source for source, _, _ in missing],
    )


def main(argv: list[str] | None = None, prog: str = "python -m ingest.evaluate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--limit", type=int, default=200, help="originals to use, spread over the folder (default 200)")
    parser.add_argument("--transforms", default=",".join(EDITS), help=f"comma-separated subset of: {', '.join(EDITS)}")
    parser.add_argument("--siblings", action="store_true", help="store two other crops of each photo beside it (in-process only)")
    parser.add_argument("--seed", type=int, default=0, help="the queries are the same for the same seed")
    parser.add_argument("--service-url", help="evaluate a running service whose collection holds the originals")
    parser.add_argument("--api-key", default="", help="the service's API key (search scope), if it needs one")
    parser.add_argument(
        "--mode", choices=("both", "copies", "similar"), default="both",
        help="both: the product's answer (copies first, then similar images; default); similar: the similarity model "
        "alone; copies: the copy model's whole ranking (what its thresholds are chosen from)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    return run_tool("evaluate", lambda settings: _evaluate(args, settings), verbose=False)


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    transforms = [name.strip() for name in args.transforms.split(",") if name.strip()]
    unknown = sorted(set(transforms) - set(EDITS))
    if unknown:
        raise UsageError(f"unknown transforms {', '.join(unknown)}")
    if not args.folder.is_dir():
        raise UsageError(f"{args.folder} is not a folder")
    if args.service_url:
        if args.siblings:
            raise UsageError("--siblings needs the in-process mode (it stores extra images)")
        if args.mode == "copies":
            raise UsageError("--mode copies needs the in-process mode (it sees every score)")
        try:
            report = evaluate_service(
                args.folder, args.service_url, args.api_key, limit=args.limit, transforms=transforms, seed=args.seed, mode=args.mode
            )
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"{args.service_url}: {exc}") from exc
    else:
        report = evaluate_folder(
            args.folder, limit=args.limit, transforms=transforms, seed=args.seed, with_siblings=args.siblings, mode=args.mode,
            settings=settings,
        )
    print(report.model_dump_json(indent=2) if args.json else report.table())  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

