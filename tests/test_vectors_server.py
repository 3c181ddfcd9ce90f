"""The vector index on a real Milvus 2.3 server, where index builds and loads are real: a rebuild that
fails after the old index was dropped leaves the previous index built and loaded, searches go on."""

import threading

import numpy as np
import pytest
from pymilvus.exceptions import MilvusException

from bento.adapters.vectors import VectorIndex
from bento.core.config import Settings
from bento.core.errors import BackendUnavailable, Conflict, InvalidRequest
from bento.domain.schemas import IndexSpec, VectorQuery
from tests.support import toy_model as _model
from tests.support import toy_records as _records

pytestmark = pytest.mark.slow


@pytest.fixture
def index(milvus_server, tmp_path, request):
    collection = "rebuild_" + request.node.name.split("[")[0][-20:]
    settings = Settings(data_dir=tmp_path, milvus={"uri": milvus_server.uri, "collection": collection, "timeout_s": 60})
    index = VectorIndex(settings, _model())
    index.upsert(_records(64, np.random.default_rng(1)))
    index.flush()
    yield index
    index._run("drop_collection", lambda c, t: c.drop_collection(collection, timeout=t))
    index.close()


def test_a_failed_rebuild_restores_the_previous_index(index, monkeypatch):
    records = _records(64, np.random.default_rng(1))
    before = index.info().index
    real_create = index._create_index

    def failing_create(client, spec):
        if spec.index_type == "IVF_FLAT":
            raise MilvusException(message="index build failed (injected after the old index was dropped)")
        real_create(client, spec)

    monkeypatch.setattr(index, "_create_index", failing_create)
    with pytest.raises(BackendUnavailable, match="previous HNSW index was restored"):
        index.rebuild_index(IndexSpec(index_type="IVF_FLAT", params={"nlist": 8}))
    assert index.info().index == before and index.info().loaded
    index.ping()  # loaded: searches go on
    assert index.search(VectorQuery(vector=records[5].vector, top_k=1))[0].image.id == records[5].id
    described = index._run("describe_index", lambda c, t: c.describe_index(index.settings.milvus.collection, "vector", timeout=t))
    assert described["index_type"] == "HNSW"
    reopened = VectorIndex(index.settings, _model())
    assert reopened.info().index == before, "the collection's record still names the previous index"
    reopened.close()


def test_one_rebuild_at_a_time_and_bounds_before_anything_is_dropped(index):
    with pytest.raises(InvalidRequest, match="M must be between 4 and 64"):
        index.rebuild_index(IndexSpec(index_type="HNSW", params={"M": 1_000_000}))
    assert index.info().loaded
    holding = threading.Event()
    release = threading.Event()

    def slow_rebuild() -> None:
        with index._rebuilding:  # what a running rebuild holds
            holding.set()
            release.wait(30)

    runner = threading.Thread(target=slow_rebuild)
    runner.start()
    holding.wait(10)
    try:
        with pytest.raises(Conflict, match="already running"):
            index.rebuild_index(IndexSpec(index_type="FLAT"))
    finally:
        release.set()
        runner.join()
    assert index.rebuild_index(IndexSpec(index_type="FLAT")).index.index_type == "FLAT"
