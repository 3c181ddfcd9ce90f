"""Several vectors per image (views), grouped by image in search; min_score; the duplicate finder."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from bento.adapters.vectors import VectorIndex
from bento.core.config import Settings
from bento.domain.duplicates import DuplicateQuery, ImageVector, find_duplicates
from bento.domain.schemas import Thresholds, VectorQuery, VectorRecord
from models.pipeline import pixel_hash
from models.preprocess import LOW_RES, Preprocessing
from tests.support import TOY_DIM as DIM
from tests.support import toy_model

VIEWS = 3


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _image(i: int, vectors: np.ndarray, label: str = "", pixel: str = "") -> VectorRecord:
    return VectorRecord(
        id=f"{i:064x}", label=label, mime="image/jpeg", width=10, height=10, size_bytes=100, source=f"f{i}.jpg",
        created_at=0, pixel_hash=pixel or f"p{i}", vector=vectors[0].tolist(), views=[v.tolist() for v in vectors[1:]],
    )


@pytest.fixture
def index(tmp_path):
    vectors = VectorIndex(Settings(data_dir=tmp_path), toy_model(vectors_per_image=VIEWS))
    yield vectors
    vectors.close()


def test_each_image_appears_once_with_its_best_view(index):
    rng = np.random.default_rng(0)
    query = _unit(rng.normal(size=DIM))
    # Every view of every image is close to the query, so a search without grouping would return the
    # same image up to three times; view k of image i is the closest for i % 3 == k.
    records = []
    for i in range(12):
        views = _unit(query + rng.normal(scale=0.6, size=(VIEWS, DIM)))
        views[i % VIEWS] = _unit(query + rng.normal(scale=0.05 + 0.01 * i, size=DIM))
        records.append(_image(i, views))
    assert index.upsert(records) == 12
    assert index.count() == 12  # images, not rows
    hits = index.search(VectorQuery(vector=query.tolist(), top_k=12))
    ids = [hit.image.id for hit in hits]
    assert len(ids) == len(set(ids)) == 12
    for hit in hits:
        record = next(r for r in records if r.id == hit.image.id)
        best = max(float(np.dot(query, v)) for v in [record.vector, *record.views])
        assert hit.score == pytest.approx(best, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Paging over grouped hits: page two is exactly the continuation of page one.
    page = index.search(VectorQuery(vector=query.tolist(), top_k=4, offset=4))
    assert [h.image.id for h in page] == ids[4:8]
    # Deleting an image removes all its views; the main view is what get_vector returns.
    assert index.get_vector(records[3].id) == pytest.approx(records[3].vector, abs=1e-6)
    assert index.delete([records[3].id]) == 1
    assert records[3].id not in {h.image.id for h in index.search(VectorQuery(vector=query.tolist(), top_k=12))}
    assert index.count() == 11


def test_extra_query_vectors_are_searched_like_the_main_one(index):
    """A small query is also embedded at its low-res views' input side: both vectors are searched over the
    same views in one request, and each image appears once with its best score (margins applied)."""
    rng = np.random.default_rng(3)
    main_query, extra = _unit(rng.normal(size=(2, DIM)))
    noise = lambda: _unit(rng.normal(size=(VIEWS, DIM)))  # noqa: E731
    through_view_2 = noise()
    through_view_2[2] = extra  # found by the extra vector through view 2 (score 1 - its margin)
    through_main = noise()
    through_main[0] = extra  # and through a main view (no margin)
    nearby = noise()
    nearby[0] = _unit(main_query + rng.normal(scale=0.1, size=DIM))  # the main vector's best match
    others = [noise() for _ in range(9)]
    records = [_image(i, v) for i, v in enumerate([through_view_2, through_main, nearby, *others])]
    index.upsert(records)
    plain = VectorQuery(vector=main_query.tolist(), top_k=3, views=[0, 2], margins={2: 0.05})
    assert index.search(plain)[0].image.id == records[2].id
    assert not {records[0].id, records[1].id} & {h.image.id for h in index.search(plain)}
    hits = index.search(plain.model_copy(update={"extra_vectors": [extra.tolist()]}))
    assert [h.image.id for h in hits] == [records[1].id, records[0].id, records[2].id]
    assert [h.score for h in hits[:2]] == pytest.approx([1.0, 0.95], abs=1e-4)
    # The views searched are the query's: without view 2, the extra vector finds only the main-view twin.
    main_only = index.search(VectorQuery(vector=main_query.tolist(), top_k=3, views=[0], extra_vectors=[extra.tolist()]))
    assert [h.image.id for h in main_only[:2]] == [records[1].id, records[2].id]
    assert records[0].id not in {h.image.id for h in main_only}
    # Paging over the merged hits: page two continues page one.
    everything = index.search(plain.model_copy(update={"extra_vectors": [extra.tolist()], "top_k": 8}))
    page = index.search(plain.model_copy(update={"extra_vectors": [extra.tolist()], "top_k": 4, "offset": 4}))
    assert [h.image.id for h in page] == [h.image.id for h in everything[4:8]]
    assert len({h.image.id for h in everything}) == 8


def test_min_score_drops_weaker_hits(index):
    rng = np.random.default_rng(1)
    query = _unit(rng.normal(size=DIM))
    records = [_image(i, _unit(query + rng.normal(scale=0.2 * (i + 1), size=(VIEWS, DIM)))) for i in range(10)]
    index.upsert(records)
    everything = index.search(VectorQuery(vector=query.tolist(), top_k=10))
    cut = everything[4].score
    kept = index.search(VectorQuery(vector=query.tolist(), top_k=10, min_score=cut))
    assert [h.image.id for h in kept] == [h.image.id for h in everything[:5]]
    assert all(h.score >= cut for h in kept)


def test_an_image_needs_all_its_views(index):
    from bento.core.errors import InvalidRequest

    one_view = _image(1, _unit(np.ones((1, DIM))))
    with pytest.raises(InvalidRequest, match="needs 3 vectors"):
        index.upsert([one_view])


def test_verdicts_follow_the_thresholds():
    thresholds = Thresholds(same_image=0.9, near_duplicate=0.7)
    assert [thresholds.verdict(s) for s in (0.95, 0.9, 0.8, 0.69)] == ["same-image", "same-image", "near-duplicate", "similar"]
    assert Thresholds(same_image=None, near_duplicate=None).verdict(1.0) is None


def test_the_low_res_view_is_a_small_copy():
    recipe = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = Image.effect_noise((640, 480), 60).convert("RGB")
    views = recipe.view_pixels(image)
    assert recipe.views == (LOW_RES,) and len(views) == recipe.vectors_per_image
    # The main view at the model's crop; the low-res copy at its own, smaller input side (a quarter of the
    # compute), resized in the same proportion as the main view (256/224 -> 128/112).
    assert views[0].shape == (224, 224, 3) and views[1].shape == (112, 112, 3)
    assert recipe.input_sides == (224, 112) and recipe.view_side(1) == 112
    assert np.array_equal(views[0], recipe.to_pixels(image))
    small = LOW_RES.apply(image)
    assert small.size == (64, 48)
    resized = small.resize((170, 128), Image.Resampling.BILINEAR).crop((29, 8, 141, 120))
    assert np.array_equal(views[1], np.asarray(resized))
    # The low-res copy has lost the fine grain: far less high-frequency energy than the main view.
    def grain(pixels: np.ndarray) -> float:
        return float(np.abs(np.diff(pixels.astype(np.float32), axis=1)).mean())
    assert grain(views[1]) < 0.5 * grain(views[0])
    assert "low-res-64@112" in recipe.version and recipe.version.startswith("v3:")


def test_a_small_query_is_also_prepared_at_the_low_res_side():
    """A thumbnail query meets the stored low-res copies in their own domain: its pixels at their 112-px side
    are what the stored copy of its original looks like there; a large query has no such pixels."""
    from models.imaging import DecodeLimits
    from models.pipeline import prepare_image

    recipe = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    limits = DecodeLimits(max_bytes=10**7, max_pixels=10**8)
    photo = Image.effect_mandelbrot((640, 480), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    thumbnail = photo.copy()
    thumbnail.thumbnail((64, 64), Image.Resampling.LANCZOS)
    small = prepare_image(_png(thumbnail), limits, recipe, None)
    assert small.views is None and set(small.side_pixels) == {112}
    stored_low_res = recipe.view_pixels(photo)[1]
    assert np.array_equal(small.side_pixels[112], stored_low_res)
    assert prepare_image(_png(photo), limits, recipe, None).side_pixels == {}
    assert prepare_image(_png(photo), limits, recipe, None, all_views=True).side_pixels == {}


def test_both_models_pixels_come_from_one_decode_and_only_a_stored_image_gets_its_exact_key():
    """The copy model's pixels (made in a helper thread beside the similarity model's) are its recipe applied
    to the same decoded picture, its views too for an image to store; the exact-duplicate key (a hash of the
    decoded pixels) is made for an image to store only: a query never uses it."""
    from models.imaging import DecodeLimits
    from models.pipeline import prepare_image
    from models.preprocess import VIEW_SETS

    recipe = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    copy_recipe = Preprocessing(resize=288, crop=288, mean=(0.0,) * 3, std=(1.0,) * 3, fit="square", views=VIEW_SETS["crops-60"])
    limits = DecodeLimits(max_bytes=10**7, max_pixels=10**8)
    photo = Image.effect_mandelbrot((640, 480), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    query = prepare_image(_png(photo), limits, recipe, None, copy=copy_recipe)
    stored = prepare_image(_png(photo), limits, recipe, 64, all_views=True, copy=copy_recipe)
    assert np.array_equal(query.copy_pixels, copy_recipe.to_pixels(photo)) and query.copy_views is None
    assert np.array_equal(query.pixels, recipe.to_pixels(photo))
    assert stored.copy_views is not None and len(stored.copy_views) == 1 + len(VIEW_SETS["crops-60"])
    for made, expected in zip(stored.copy_views, copy_recipe.view_pixels(photo), strict=True):
        assert np.array_equal(made, expected)
    assert np.array_equal(stored.copy_pixels, stored.copy_views[0])
    assert query.pixel_hash is None and stored.pixel_hash == pixel_hash(photo)
    assert prepare_image(_png(photo), limits, recipe, None).copy_pixels is None  # no copy model, no copy pixels


def test_a_recipe_has_at_most_one_smaller_input_side():
    """Each input side has its own batcher in the embedder: the main crop's and one smaller side's."""
    from pydantic import ValidationError

    base = {"resize": 256, "crop": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    other = LOW_RES.model_copy(update={"name": "low-res-96", "input_side": 96})
    assert Preprocessing(**base, views=(LOW_RES, LOW_RES.model_copy(update={"name": "again"}))).input_sides == (224, 112)
    with pytest.raises(ValidationError, match="one input side besides"):
        Preprocessing(**base, views=(LOW_RES, other))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, **params)
    return out.getvalue()


def test_duplicate_groups_are_exact_on_a_constructed_collection():
    rng = np.random.default_rng(2)
    base = _unit(rng.normal(size=(6, DIM)))
    images = [
        # a, b: the same pixels (b is a copy with other metadata); c: an edited copy of a; d, e, f unrelated;
        # e and f are near each other: a second near group.
        ImageVector(id="a", pixel_hash="h1", vector=base[0]),
        ImageVector(id="b", pixel_hash="h1", vector=base[0]),
        ImageVector(id="c", pixel_hash="h2", vector=_unit(base[0] + 0.15 * base[1])),
        ImageVector(id="d", pixel_hash="h3", vector=base[2]),
        ImageVector(id="e", pixel_hash="h4", vector=base[3]),
        ImageVector(id="f", pixel_hash="h5", vector=_unit(base[3] + 0.1 * base[4])),
    ]
    report = find_duplicates(images, near_threshold=0.95)
    groups = {(g.kind, tuple(sorted(m.id for m in g.members))) for g in report.groups}
    assert groups == {("exact", ("a", "b")), ("near", ("a", "b", "c")), ("near", ("e", "f"))}
    assert (report.exact_groups, report.near_groups, report.image_count) == (1, 2, 6)
    near = next(g for g in report.groups if g.kind == "near" and len(g.members) == 3)
    assert near.members[0].score == pytest.approx(1.0) and all(m.score >= 0.95 for m in near.members)
    # A high threshold leaves only the exact group.
    strict = find_duplicates(images, near_threshold=0.9999)
    assert [(g.kind, len(g.members)) for g in strict.groups] == [("exact", 2)]


def test_the_pixel_hash_ignores_metadata_but_not_pixels():
    image = Image.effect_noise((120, 80), 40).convert("RGB")
    plain = _jpeg(image)
    exif = Image.Exif()
    exif[0x010E] = "a description"  # ImageDescription
    tagged = _jpeg(image, exif=exif.tobytes())
    assert plain != tagged
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in (plain, tagged)]
    assert pixel_hash(decoded[0]) == pixel_hash(decoded[1])
    assert pixel_hash(decoded[0]) != pixel_hash(decoded[0].rotate(1))


def test_the_service_scan_runs_in_the_background_and_pages(index):
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=(5, DIM)))
    records = [_image(i, np.repeat(base[i % 5][None], VIEWS, axis=0), pixel="same" if i in (0, 5) else "") for i in range(10)]
    index.upsert(records)
    first = index.duplicates(DuplicateQuery(near_threshold=0.99))
    assert first.state == "running"
    deadline = time.monotonic() + 30
    while (page := index.duplicates(DuplicateQuery(near_threshold=0.99, limit=2))).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Five pairs of identical vectors (i, i + 5); pair (0, 5) also has the same pixels: it is one exact
    # group (not repeated as a near one), and the four others are near groups.
    assert page.total == 5 and len(page.groups) == 2 and page.groups[0].kind == "exact"
    rest = index.duplicates(DuplicateQuery(near_threshold=0.99, offset=2, limit=10))
    assert rest.state == "ready" and len(rest.groups) == 3 and all(g.kind == "near" for g in rest.groups)
    assert index.duplicates(DuplicateQuery(near_threshold=0.99, refresh=True)).state == "running"


def test_queries_meet_only_the_views_meant_for_their_size(index):
    rng = np.random.default_rng(4)
    query = _unit(rng.normal(size=DIM))
    far = _unit(rng.normal(size=(VIEWS, DIM)))
    only_view_two = far.copy()
    only_view_two[2] = query  # the image matches the query through its view 2 only
    index.upsert([_image(1, only_view_two), _image(2, far)])
    every_view = index.search(VectorQuery(vector=query.tolist(), top_k=2))
    assert every_view[0].image.id == f"{1:064x}" and every_view[0].score == pytest.approx(1.0, abs=1e-4)
    main_only = index.search(VectorQuery(vector=query.tolist(), top_k=2, views=[0]))
    assert all(hit.score < 0.9 for hit in main_only)
    # A margin makes a match through that view count for less (the hit's score says so too).
    discounted = index.search(VectorQuery(vector=query.tolist(), top_k=2, margins={2: 0.1}))
    assert discounted[0].image.id == f"{1:064x}" and discounted[0].score == pytest.approx(0.9, abs=1e-4)
    recipe = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert recipe.views_for_query(64, 48) == [0, 1]  # a thumbnail also meets the low-res copies
    assert recipe.views_for_query(1024, 768) == [0]
