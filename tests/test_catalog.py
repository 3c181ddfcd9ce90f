"""The catalog (bento/domain/catalog.py) in-process, over a real Milvus Lite file and local image store: the
flows the HTTP API and the ingest job share."""

import io

import numpy as np
import pytest
from PIL import Image

from bento.core.config import Settings
from bento.core.errors import InvalidImage, InvalidRequest, NotFound
from bento.core.ids import content_hash
from bento.domain.catalog import NewImage, clean_label
from bento.domain.schemas import SearchOptions
from tests.support import local_catalog


class CountingEmbedding:
    """The real model, counting how many images it was asked to embed."""

    def __init__(self, embedder) -> None:
        self.embedder, self.embedded = embedder, 0

    def describe(self):
        return self.embedder.describe()

    def describe_copy(self):
        return self.embedder.describe_copy()

    def embed(self, pixels: np.ndarray, role: str = "similarity") -> np.ndarray:
        self.embedded += len(pixels)
        return self.embedder.embed(pixels, role)


@pytest.fixture
def catalog(efficientnet_alone, tmp_path):
    catalog = local_catalog(Settings(data_dir=tmp_path / "data"), CountingEmbedding(efficientnet_alone))
    yield catalog
    catalog.close()


def test_add_is_idempotent_and_search_finds_the_original(catalog, photo_set):
    data = photo_set["originals"]["chelsea"]
    first = catalog.add(data, " cat ", "chelsea.jpg")
    assert first.created and first.id == content_hash(data) and first.image.label == "cat"
    again = catalog.add(data, "cat", "other-name.jpg")
    assert not again.created and again.image.source == "chelsea.jpg" and catalog.vectors.count() == 1
    catalog.add(photo_set["originals"]["coffee"], "coffee", "coffee.jpg")
    result = catalog.search_image(photo_set["queries"]["chelsea"], SearchOptions(top_k=2))
    assert [hit.image.id for hit in result.hits][0] == first.id and result.query_id != first.id
    assert result.timings.embed_ms > 0 and result.model.startswith("efficientnet-lite0@")
    by_id = catalog.search_stored(first.id, SearchOptions(top_k=1, label="cat"))
    assert by_id.hits[0].image.id == first.id and by_id.hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_a_thumbnail_meets_its_original_at_the_low_res_side(catalog, photo_set):
    """Stored: the main view at 224 px and the 64-px copy at 112 px (two vectors, two embedding calls: one
    per input side). A 64-px thumbnail query is embedded at both sides; a large query at the main one."""
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    before = catalog.embedding.embedded
    added = catalog.add_many([NewImage(catalog.prepare(photo_set["originals"][n], to_store=True), n, f"{n}.jpg") for n in names])
    assert catalog.embedding.embedded - before == 2 * len(names)
    searched = []
    search = catalog.vectors.search
    catalog.vectors.search = lambda query: searched.append(query) or search(query)
    for name, image in zip(names, added, strict=True):
        thumbnail = Image.open(io.BytesIO(photo_set["originals"][name])).convert("RGB")
        thumbnail.thumbnail((64, 64), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        thumbnail.save(out, format="JPEG", quality=90)
        hits = catalog.search_image(out.getvalue(), SearchOptions(top_k=2)).hits
        assert hits[0].image.id == image.id and hits[0].score > 0.85, (name, hits)
        assert len(searched[-1].extra_vectors) == 1 and searched[-1].views == [0, 1]
    catalog.search_image(photo_set["originals"]["chelsea"], SearchOptions(top_k=2))
    assert searched[-1].extra_vectors == [] and searched[-1].views == [0], "a large query meets the main views only"


def test_a_lost_original_is_repaired_without_embedding_again(catalog, photo_set):
    data = photo_set["originals"]["rocket"]
    added = catalog.add(data, "rocket", "rocket.jpg")
    catalog.store.delete(added.id)
    assert catalog.complete_ids([added.id]) == set(), "a row without its original is not complete"
    embedded = catalog.embedding.embedded
    repaired = catalog.add_many([NewImage(catalog.prepare(data, to_store=True), "rocket", "rocket.jpg")])[0]
    assert not repaired.created and catalog.embedding.embedded == embedded
    assert catalog.blob(added.id, "original") == (data, "image/jpeg")
    assert catalog.complete_ids([added.id]) == {added.id}


def test_remove_takes_row_and_blobs_and_then_is_not_found(catalog, photo_set):
    added = catalog.add(photo_set["originals"]["coins"], "", "coins.jpg")
    catalog.remove(added.id)
    assert catalog.vectors.count() == 0 and not catalog.store.exists(added.id, "thumbnail")
    with pytest.raises(NotFound):
        catalog.remove(added.id)
    with pytest.raises(NotFound):
        catalog.metadata(added.id)
    with pytest.raises(InvalidRequest):
        catalog.remove("../../etc/passwd")


def test_rules_are_enforced_once_for_every_caller(catalog, photo_set):
    assert clean_label("  person ") == "person" and clean_label(None) == ""
    for bad in ("x\ny", "tab\there", "x" * 257, "del\x7f"):
        with pytest.raises(InvalidRequest):
            clean_label(bad)
    with pytest.raises(InvalidImage):
        catalog.add(b"not an image", "", "x.txt")
    with pytest.raises(InvalidRequest, match="top_k is at most"):
        catalog.search_image(photo_set["queries"]["coins"], SearchOptions(top_k=10_000))
    assert catalog.vectors.count() == 0, "nothing half-added"


def test_embed_pixels_checks_the_models_recipe(catalog):
    vectors, model = catalog.embed_pixels(np.zeros((2, 224, 224, 3), dtype=np.uint8))
    assert vectors.shape == (2, 1280) and model.backbone == "efficientnet-lite0"
    # The low-res view's input side is the recipe's too (the remote ingest sends those views as well).
    small, _ = catalog.embed_pixels(np.zeros((2, 112, 112, 3), dtype=np.uint8))
    assert small.shape == (2, 1280) and np.allclose(np.linalg.norm(small, axis=1), 1, atol=1e-4)
    for shape in ((1, 100, 100, 3), (1, 112, 224, 3), (1, 113, 113, 3), (1, 112, 112, 4)):
        with pytest.raises(InvalidRequest, match=r"\(N<=1024, 224, 224, 3\) or \(N<=1024, 112, 112, 3\)"):
            catalog.embed_pixels(np.zeros(shape, dtype=np.uint8))
    with pytest.raises(InvalidRequest):
        catalog.embed_pixels(np.zeros((1, 224, 224, 3), dtype=np.float32))


def test_embedding_calls_stay_within_the_batch_limit(tmp_path, monkeypatch):
    """A batch of images times their views can exceed what one embedding call takes: it is split."""
    import bento.domain.catalog as catalog_module
    from bento.domain.catalog import Catalog

    calls = []

    class Counting:
        def embed(self, pixels, role="similarity"):
            calls.append(len(pixels))
            return np.ones((len(pixels), 4), dtype=np.float32)

    monkeypatch.setattr(catalog_module, "max_batch", lambda side: 5)
    catalog = Catalog.__new__(Catalog)
    catalog.embedding, catalog.retry = Counting(), catalog_module.FAIL_FAST
    out = catalog._embed(np.zeros((12, 2, 2, 3), dtype=np.uint8))
    assert out.shape == (12, 4) and calls == [5, 5, 2]


@pytest.mark.parametrize("mode", ["both", "similar"])
def test_pages_say_whether_more_follow_and_walk_the_whole_list_exactly(both_models, photo_set, tmp_path, mode):
    """Each page says has_more/next_offset; following next_offset page by page gives exactly the one-page
    answer (copies first, then similar images, each image once), and the last page says no more."""
    catalog = local_catalog(Settings(data_dir=tmp_path / "data"), both_models)
    try:
        for name, data in photo_set["originals"].items():
            catalog.add(data, "", f"{name}.jpg")
        query = photo_set["queries"]["rocket"]
        whole = catalog.search_image(query, SearchOptions(top_k=50, mode=mode))
        assert 5 <= len(whole.hits) < 50 and not whole.has_more and whole.next_offset is None
        if mode == "both":
            assert whole.hits[0].match == "copy" and whole.hits[-1].match == "similar"
        walked, offset, pages = [], 0, 0
        while offset is not None:
            page = catalog.search_image(query, SearchOptions(top_k=3, offset=offset, mode=mode))
            assert page.has_more == (page.next_offset is not None)
            walked += [(hit.image.id, hit.match) for hit in page.hits]
            offset, pages = page.next_offset, pages + 1
        assert walked == [(hit.image.id, hit.match) for hit in whole.hits]
        assert pages == -(-len(whole.hits) // 3)
        exact = catalog.search_image(query, SearchOptions(top_k=len(whole.hits), mode=mode))
        assert not exact.has_more and len(exact.hits) == len(whole.hits)  # a page that ends with the list
        short = catalog.search_image(query, SearchOptions(top_k=len(whole.hits) - 1, mode=mode))
        assert short.has_more and short.next_offset == len(whole.hits) - 1
    finally:
        catalog.close()
