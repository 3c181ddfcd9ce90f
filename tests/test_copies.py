"""Two questions, two models: copies and edits found by the copy model (SSCD), similar images by the
similarity model; one search answers both (bento/domain/catalog.py), on both Milvus backends."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from bento.adapters.vectors import copy_collection
from bento.core.config import Settings
from bento.core.errors import InvalidRequest
from bento.core.ids import content_hash
from bento.domain.catalog import NewImage
from bento.domain.schemas import SearchOptions
from ingest.demo import GENERATED, encode, load_photo
from tests.support import local_catalog


class Counting:
    """An Embedding port that counts the images each role's model was asked to embed."""

    def __init__(self, inner) -> None:
        self.inner, self.embedded = inner, {"similarity": 0, "copy": 0}

    def describe(self):
        return self.inner.describe()

    def describe_copy(self):
        return self.inner.describe_copy()

    def embed(self, pixels: np.ndarray, role: str = "similarity") -> np.ndarray:
        self.embedded[role] += len(pixels)
        return self.inner.embed(pixels, role)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _caption(image: Image.Image) -> Image.Image:
    """An edited copy as people share them: a border and a caption bar."""
    canvas = Image.new("RGB", (image.width + 40, image.height + 80), (250, 250, 250))
    canvas.paste(image, (20, 40))
    return canvas


@pytest.fixture
def two_models(backend, both_models):
    catalog = local_catalog(backend.settings(), Counting(both_models))
    yield catalog
    catalog.close()


def _add(catalog, blobs: dict[str, bytes]) -> dict[str, str]:
    added = catalog.add_many([NewImage(catalog.prepare(data, to_store=True), name, f"{name}.jpg") for name, data in blobs.items()])
    return {name: item.id for name, item in zip(blobs, added, strict=True)}


def test_a_search_lists_the_copies_first_then_similar_images_each_once(two_models, photo_set):
    originals = photo_set["originals"]
    chelsea = load_photo("chelsea")
    blobs = {name: originals[name] for name in ("chelsea", "coffee", "rocket", "astronaut")}
    blobs["chelsea-shared"] = _jpeg(_caption(chelsea), 70)  # an edited copy stored beside its original
    ids = _add(two_models, blobs)
    assert two_models.vectors.count() == 5 and two_models.copies.count() == 5

    # A flipped, re-compressed copy of the cat: both stored versions of the picture are copies, first.
    query = _jpeg(ImageOps.mirror(chelsea).resize((chelsea.width // 2, chelsea.height // 2)), 60)
    result = two_models.search_image(query, SearchOptions(top_k=5))
    assert result.mode == "both" and result.copy_model.startswith("sscd-distilled@")
    matches = [hit.match for hit in result.hits]
    copies = [hit for hit in result.hits if hit.match == "copy"]
    assert {hit.image.id for hit in copies} == {ids["chelsea"], ids["chelsea-shared"]}, [(h.image.label, h.score) for h in result.hits]
    assert matches == ["copy", "copy", "similar", "similar", "similar"]
    assert all(hit.verdict in ("same-image", "near-duplicate") for hit in copies)
    assert all(hit.verdict in ("similar", "unrelated") for hit in result.hits[2:])
    assert len({hit.image.id for hit in result.hits}) == 5, "each image once"
    assert copies[0].score >= copies[1].score

    only_copies = two_models.search_image(query, SearchOptions(top_k=5, mode="copies"))
    assert [hit.image.id for hit in only_copies.hits] == [hit.image.id for hit in copies]
    only_similar = two_models.search_image(query, SearchOptions(top_k=5, mode="similar"))
    assert {hit.match for hit in only_similar.hits} == {"similar"} and len(only_similar.hits) == 5

    # Paging over the joined list is exact: pages of 2 are the page of 5, cut.
    pages = [hit.image.id for offset in (0, 2, 4) for hit in two_models.search_image(query, SearchOptions(top_k=2, offset=offset)).hits]
    assert pages == [hit.image.id for hit in result.hits]
    assert two_models.embedding.embedded["copy"] >= 5

    # By id: the stored copy vector finds the other version of the picture first.
    by_id = two_models.search_stored(ids["chelsea-shared"], SearchOptions(top_k=3))
    assert [hit.match for hit in by_id.hits[:2]] == ["copy", "copy"]
    assert by_id.hits[0].image.id == ids["chelsea-shared"] and by_id.hits[1].image.id == ids["chelsea"]


def test_with_no_copy_stored_the_similar_list_is_the_similarity_models(two_models, both_models, photo_set):
    """A query that has no copy in the collection: the answer is the similarity model's own ranking (same ids,
    same order, same scores) and nothing is called a copy."""
    _add(two_models, {name: photo_set["originals"][name] for name in ("chelsea", "coffee", "rocket", "astronaut")})
    import random

    query = encode(GENERATED["shapes"](random.Random(11)))
    both = two_models.search_image(query, SearchOptions(top_k=4))
    similar = two_models.search_image(query, SearchOptions(top_k=4, mode="similar"))
    assert [hit.match for hit in both.hits] == ["similar"] * 4
    assert [(h.image.id, round(h.score, 5)) for h in both.hits] == [(h.image.id, round(h.score, 5)) for h in similar.hits]


def test_a_missing_copy_row_is_repaired_without_re_embedding_the_rest(efficientnet, both_models, photo_set, tmp_path):
    """An image added before the copy model (or a crash between its two writes) is incomplete; adding it
    again writes its copy row only."""
    settings = Settings(data_dir=tmp_path / "data")
    data = photo_set["originals"]["coffee"]
    before = local_catalog(settings, efficientnet)  # the similarity model alone: no copy collection
    before.add(data, "coffee", "coffee.jpg")
    before.close()

    catalog = local_catalog(settings, Counting(both_models))
    try:
        image_id = content_hash(data)
        assert catalog.complete_ids([image_id]) == set(), "no copy row: not complete"
        again = catalog.add(data, "other", "again.jpg")
        assert not again.created and again.image.label == "coffee"
        assert catalog.embedding.embedded == {"similarity": 0, "copy": 1}
        assert catalog.complete_ids([image_id]) == {image_id}
        copy_rows = catalog.copies.get([image_id])
        assert copy_rows[0].label == "coffee" and copy_rows[0].source == "coffee.jpg"
        hits = catalog.search_image(data, SearchOptions(top_k=1, mode="copies")).hits
        assert hits[0].image.id == image_id and hits[0].verdict == "same-image"

        catalog.remove(image_id)  # both collections, then the blobs
        assert catalog.vectors.count() == 0 and catalog.copies.count() == 0
        assert catalog.search_image(data, SearchOptions(top_k=1, mode="copies")).hits == []
    finally:
        catalog.close()


def test_the_source_outranks_its_stored_quarter_with_copy_views(efficientnet, sscd, tmp_path):
    """A 60 % crop of a photo whose top-left quarter is stored beside it: the whole image alone meets the
    crop less well than the quarter does; with the stored crops-60 views the photo comes first."""
    from models.embedding import Embedders
    from models.store import load_copy_embedder

    photo = load_photo("astronaut")
    w, h = photo.size
    quarter = photo.crop((0, 0, w // 2, h // 2))
    query = _jpeg(photo.crop((int(0.05 * w), int(0.05 * h), int(0.65 * w), int(0.65 * h))))
    firsts = {}
    for views in ("", "crops-60"):
        settings = Settings(data_dir=tmp_path / (views or "plain"), model={"copy_name": "sscd-distilled", "copy_views": views})
        copy = sscd if not views else load_copy_embedder(settings)
        catalog = local_catalog(settings, Embedders(efficientnet, copy))
        try:
            ids = _add(catalog, {"photo": _jpeg(photo), "quarter": _jpeg(quarter)})
            hits = catalog.search_image(query, SearchOptions(top_k=2, mode="copies")).hits
            firsts[views] = next(name for name, image_id in ids.items() if image_id == hits[0].image.id)
            if views:
                assert catalog.copy_model().info.vectors_per_image == 6
        finally:
            catalog.close()
    assert firsts == {"": "quarter", "crops-60": "photo"}


def test_a_64_px_thumbnail_is_found_as_a_copy_by_re_checking_its_candidates_at_its_size(both_models, tmp_path, caplog):
    """A 64-px thumbnail blown up to the copy model's input meets its sharp original at a score under the
    near-duplicate threshold (the rocket's: no copy at all). Its best candidates, brought to its size from their
    stored thumbnails, score it as the same image; another photo does not rise. min_score applies to the score
    shown, paging stays exact, and a thumbnail or a store that cannot be read leaves the stored scores."""
    from bento.core.errors import BackendUnavailable

    photos = {name: load_photo(name) for name in ("rocket", "astronaut", "coffee", "chelsea", "camera", "moon")}
    thumbnail = photos["rocket"].copy()
    thumbnail.thumbnail((64, 64), Image.Resampling.LANCZOS)
    query = _jpeg(thumbnail)
    found = {}
    for side in (0, 128):
        settings = Settings(data_dir=tmp_path / str(side), model={"copy_recheck_side": side})
        catalog = local_catalog(settings, both_models)
        try:
            ids = _add(catalog, {name: _jpeg(photo) for name, photo in photos.items()})
            names = {image_id: name for name, image_id in ids.items()}
            every = catalog.search_image(query, SearchOptions(top_k=6, mode="copies")).hits
            found[side] = [(names[hit.image.id], hit.verdict) for hit in every]
            if not side:
                stored = catalog.search_image(query, SearchOptions(top_k=6)).hits
                similar_score = next(hit.score for hit in stored if hit.image.id == ids["rocket"])
                catalog.close()
                # Every copy hit, whatever its score: the rocket's score on its stored copy vector.
                every_hit = settings.model_copy(update={"verdict": settings.verdict.model_copy(update={"near_duplicate": -1.0})})
                catalog = local_catalog(every_hit, both_models)
                raw = catalog.search_image(query, SearchOptions(top_k=6, mode="copies")).hits
                stored_score = next(hit.score for hit in raw if hit.image.id == ids["rocket"])
                continue
            rocket = every[0]
            assert rocket.score > stored_score + 0.1 and stored_score < catalog.thresholds().near_duplicate, (rocket.score, stored_score)
            # min_score filters the score shown: the rocket is stored under it and re-checked above it.
            cut = round((rocket.score + stored_score) / 2, 3)
            assert [hit.image.id for hit in catalog.search_image(query, SearchOptions(top_k=6, mode="copies", min_score=cut)).hits] == [ids["rocket"]]
            first = catalog.search_image(query, SearchOptions(top_k=6)).hits
            assert first[0].image.id == ids["rocket"] and first[0].match == "copy"
            assert sorted(hit.image.id for hit in first) == sorted(ids.values()), "each image once"
            pages = [catalog.search_image(query, SearchOptions(top_k=1, offset=i)) for i in range(6)]
            assert [(page.hits[0].image.id, page.hits[0].score) for page in pages] == [(hit.image.id, hit.score) for hit in first]
            assert [page.has_more for page in pages] == [True] * 5 + [False]

            # Another candidate's thumbnail gone: the rest are still re-checked.
            catalog.store.delete(ids["astronaut"])
            catalog.store.put(ids["astronaut"], "original", _jpeg(photos["astronaut"]))
            assert [hit.image.id for hit in catalog.search_image(query, SearchOptions(top_k=6, mode="copies")).hits] == [ids["rocket"]]
            # A store that cannot answer now (its folder replaced by a file: every read fails with an OSError the
            # local store reports as BackendUnavailable): the stored scores stand, the search answers, one warning.
            root = catalog.store.root
            root.rename(root.with_name("moved"))
            root.write_bytes(b"not a folder")
            try:
                with pytest.raises(BackendUnavailable):
                    catalog.store.get(ids["rocket"], "thumbnail")
                caplog.clear()
                answer = catalog.search_image(query, SearchOptions(top_k=6)).hits
            finally:
                root.unlink()
                root.with_name("moved").rename(root)
            assert [hit.match for hit in answer] == ["similar"] * 6
            assert next(hit.score for hit in answer if hit.image.id == ids["rocket"]) == similar_score
            assert sum("not re-checked" in record.message for record in caplog.records) == 1
        finally:
            catalog.close()
    assert found[0] == [], "the premise: without the re-check the rocket's thumbnail is no copy"
    assert found[128] == [("rocket", "same-image")]


def test_copies_mode_needs_a_copy_model(efficientnet, photo_set, tmp_path):
    catalog = local_catalog(Settings(data_dir=tmp_path / "data"), efficientnet)
    try:
        catalog.add(photo_set["originals"]["rocket"], "", "rocket.jpg")
        with pytest.raises(InvalidRequest, match="mode=copies needs a copy model"):
            catalog.search_image(photo_set["originals"]["rocket"], SearchOptions(mode="copies"))
        result = catalog.search_image(photo_set["originals"]["rocket"], SearchOptions(top_k=1))
        assert result.copy_model is None and result.hits[0].match == "similar" and result.hits[0].verdict == "same-image"
    finally:
        catalog.close()


def test_the_collections_are_named_and_guarded_apart(two_models, backend):
    from pymilvus import MilvusClient

    info = two_models.copies.info()
    assert info.collection == copy_collection(backend.settings().milvus.collection)
    assert info.model.dim == 512 and info.model.backbone == "sscd-distilled"
    assert two_models.vectors.info().model.dim == 1280
    if backend.name == "lite-local":
        return
    settings = backend.settings()
    client = MilvusClient(uri=settings.milvus.uri)
    try:
        props = client.describe_collection(copy_collection(settings.milvus.collection))["properties"]
        assert props["ris.model_id"].startswith("sscd-distilled@") and props["ris.dim"] == "512"
    finally:
        client.close()


def test_a_fresh_catalogs_first_search_opens_both_collections_at_once(both_models, photo_set, tmp_path):
    """The two halves of a search run at the same time: a catalog whose first call is a search opens its
    two collections concurrently (on a Lite file, whose first client starts the local server)."""
    from milvus_lite.server_manager import server_manager_instance

    settings = Settings(data_dir=tmp_path / "data")
    data = photo_set["originals"]["horse"]
    for attempt in range(3):
        catalog = local_catalog(settings, both_models)
        try:
            if attempt == 0:
                catalog.add(data, "horse", "horse.jpg")
            hits = catalog.search_image(data, SearchOptions(top_k=1)).hits
            assert hits[0].match == "copy" and hits[0].image.label == "horse"
        finally:
            catalog.close()
            server_manager_instance.release_server(settings.milvus.uri)


def test_the_copy_collection_is_searched_while_the_similarity_model_embeds(both_models, photo_set, tmp_path):
    """A search embeds the copy query first, then the similarity query while the copy collection is searched
    (I/O overlapping compute). The similarity model here waits for the copy search to have started: run one
    after the other, it would wait in vain."""
    import threading

    copy_search_started = threading.Event()

    class SimilarityWaits(Counting):
        def __init__(self, inner) -> None:
            super().__init__(inner)
            self.seen_started: list[bool] = []

        def embed(self, pixels: np.ndarray, role: str = "similarity") -> np.ndarray:
            if role == "similarity":
                self.seen_started.append(copy_search_started.wait(timeout=10))
            return super().embed(pixels, role)

    catalog = local_catalog(Settings(data_dir=tmp_path / "data"), both_models)
    try:
        catalog.add(photo_set["originals"]["horse"], "horse", "horse.jpg")
        copies = catalog.copies
        search = copies.search

        def signalling_search(query):
            copy_search_started.set()
            return search(query)

        copies.search = signalling_search
        catalog.embedding = waiting = SimilarityWaits(both_models)
        result = catalog.search_image(photo_set["originals"]["horse"], SearchOptions(top_k=2))
        assert waiting.seen_started == [True]
        assert result.hits[0].match == "copy" and result.hits[0].image.label == "horse"
        assert result.timings.embed_ms > 0 and result.timings.search_ms >= 0
        assert result.timings.total_ms == pytest.approx(
            result.timings.decode_ms + result.timings.embed_ms + result.timings.search_ms, abs=0.05
        )
    finally:
        catalog.close()
