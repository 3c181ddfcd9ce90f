"""The vector index against a real Milvus Lite file."""

import numpy as np
import pytest

import bento.adapters.vectors as vectors_module
from bento.adapters.vectors import VectorIndex, index_spec
from bento.core.config import Settings
from bento.core.errors import InvalidRequest, ModelMismatch
from bento.domain.schemas import IndexSpec, VectorQuery
from tests.support import TOY_DIM as DIM
from tests.support import toy_model as _model
from tests.support import toy_records as _records


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, milvus={"index_type": "HNSW"})


@pytest.fixture
def index(settings):
    vectors = VectorIndex(settings, _model())
    yield vectors
    vectors.close()


def test_upsert_search_get_delete_count(index):
    rng = np.random.default_rng(0)
    records = _records(30, rng)
    assert index.upsert(records) == 30
    assert index.upsert(records[:5]) == 5  # idempotent: same ids
    assert index.count() == 30
    hits = index.search(VectorQuery(vector=records[7].vector, top_k=3))
    assert hits[0].image.id == records[7].id and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].image.label == "class1" and hits[0].image.source == "file7.jpg"
    assert [m.id for m in index.get([records[2].id, "f" * 64])] == [records[2].id]
    assert index.get_vector(records[2].id) == pytest.approx(records[2].vector, abs=1e-6)
    assert index.existing_ids([records[1].id, "e" * 64]) == {records[1].id}
    assert index.delete([records[7].id, "e" * 64]) == 1
    assert index.count() == 29
    assert all(h.image.id != records[7].id for h in index.search(VectorQuery(vector=records[7].vector, top_k=10)))


def test_label_filter_and_offset_paging(index):
    rng = np.random.default_rng(1)
    records = _records(40, rng, label_of=lambda i: 'say "hi" \\ there' if i % 4 == 0 else "other")
    index.upsert(records)
    query = records[0].vector
    filtered = index.search(VectorQuery(vector=query, top_k=20, label='say "hi" \\ there'))
    assert len(filtered) == 10 and all(h.image.label == 'say "hi" \\ there' for h in filtered)
    first_page = index.search(VectorQuery(vector=query, top_k=10))
    second_page = index.search(VectorQuery(vector=query, top_k=5, offset=5))
    assert [h.image.id for h in second_page] == [h.image.id for h in first_page[5:]]


def test_reopening_with_another_model_is_refused(settings):
    first = VectorIndex(settings, _model())
    first.upsert(_records(3, np.random.default_rng(2)))
    first.close()
    for other in (_model(model_id="toy@2"), _model(preprocessing="v2")):
        intruder = VectorIndex(settings, other)
        with pytest.raises(ModelMismatch, match="refusing to mix"):
            intruder.ensure_ready()
        intruder.close()
    same = VectorIndex(settings, _model())
    assert same.count() == 3  # the data survived, and the right model still opens it
    same.close()


@pytest.mark.parametrize("index_type", ["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"])
def test_rebuild_index_keeps_results(index, index_type):
    rng = np.random.default_rng(3)
    records = _records(50, rng)
    index.upsert(records)
    spec = index.rebuild_index(IndexSpec(index_type=index_type, params={"nlist": 4} if "IVF" in index_type else {})).index
    assert index.info().index == spec and spec.index_type == index_type
    hits = index.search(VectorQuery(vector=records[11].vector, top_k=1))
    assert hits[0].image.id == records[11].id


def test_index_choice_survives_reopen(settings):
    first = VectorIndex(settings, _model())
    first.ensure_ready()
    first.rebuild_index(IndexSpec(index_type="FLAT"))
    first.close()
    again = VectorIndex(settings, _model())
    assert again.info().index.index_type == "FLAT"
    again.close()


def test_bad_index_specs_are_refused():
    with pytest.raises(InvalidRequest, match="Unknown parameters"):
        index_spec("HNSW", {"nlist": 3})


def test_large_upserts_are_chunked(index, monkeypatch):
    calls = []
    monkeypatch.setattr(vectors_module, "MAX_UPSERT_BYTES", 5 * (DIM * 4 + 2 * vectors_module.MAX_SOURCE_BYTES))
    original = index._run

    def spy(what, call, **kwargs):
        if what == "upsert":
            calls.append(what)
        return original(what, call, **kwargs)

    monkeypatch.setattr(index, "_run", spy)
    assert index.upsert(_records(23, np.random.default_rng(4))) == 23
    assert len(calls) == 5 and index.count() == 23


def test_wrong_dimension_is_refused(index):
    with pytest.raises(InvalidRequest):
        index.search(VectorQuery(vector=[0.1] * (DIM + 1), top_k=1))
