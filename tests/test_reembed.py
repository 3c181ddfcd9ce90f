"""`python -m ingest.reembed`: a collection made with an older recipe (schema 1: one vector per image) is
refused, then migrated in place from its stored originals; killed half-way, the rerun finishes the job."""

import signal
import subprocess
import time

import pytest
from pymilvus import DataType, MilvusClient

from bento.adapters.assembly import open_catalog
from bento.adapters.storage import open_image_store
from bento.adapters.vectors import copy_collection
from bento.core.config import Settings
from bento.core.errors import ModelMismatch
from bento.core.ids import content_hash
from bento.domain.schemas import SearchOptions
from ingest.demo import GENERATED, encode
from tests.support import PYTHON, ROOT, run_cli, service_env

IMAGES = 48


def _old_collection(settings: Settings, model_id: str, blobs: list[bytes]) -> None:
    """What version 1 of the product wrote: one row per image keyed by its id, no views, recipe v1."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    client = MilvusClient(uri=settings.milvus.uri)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=1280)
    for name in ("label", "mime", "source"):
        schema.add_field(name, DataType.VARCHAR, max_length=1024)
    for name in ("width", "height"):
        schema.add_field(name, DataType.INT32)
    for name in ("size_bytes", "created_at"):
        schema.add_field(name, DataType.INT64)
    properties = {
        "ris.model_id": model_id, "ris.backbone": "efficientnet-lite0", "ris.dim": "1280", "ris.schema_version": "1",
        "ris.preprocessing": "v1:bilinear-resize256-crop224-mean0.5000,0.5000,0.5000-std0.5000,0.5000,0.5000",
    }
    name = settings.milvus.collection
    client.create_collection(name, schema=schema, properties=properties)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="COSINE")
    client.create_index(name, index)
    client.load_collection(name)
    store = open_image_store(settings)
    rows = []
    for i, data in enumerate(blobs):
        image_id = content_hash(data)
        store.put(image_id, "original", data)
        rows.append({
            "id": image_id, "vector": [1.0] + [0.0] * 1279, "label": f"class{i % 3}", "mime": "image/png", "source": f"old/{i}.png",
            "width": 64, "height": 64, "size_bytes": len(data), "created_at": 1_000_000 + i,
        })
    client.insert(name, rows)
    client.close()
    _release_lite_file(settings)


def _release_lite_file(settings: Settings) -> None:
    """pymilvus keeps a Milvus Lite file's in-process server (and its lock) until the process exits; the
    job under test runs in another process."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(settings.milvus.uri)


@pytest.mark.slow
def test_an_old_collection_is_refused_then_reembedded_in_place_across_a_kill(efficientnet_alone, tmp_path):
    import random

    rng = random.Random(5)
    makers = list(GENERATED.values())
    blobs = list({encode(makers[i % len(makers)](rng), "PNG"): None for i in range(IMAGES)})
    # With the low-res view, so that the re-embed writes a view per image as well (the `efficientnet_alone` recipe).
    env = service_env(tmp_path / "data", RIS_MODEL_NAME="efficientnet-lite0", RIS_MODEL_VIEWS="low-res-64")
    settings = Settings(data_dir=tmp_path / "data", model={"name": "efficientnet-lite0", "views": "low-res-64"})
    model = efficientnet_alone.describe().info
    _old_collection(settings, model.model_id, blobs)

    catalog = open_catalog(settings, efficientnet_alone)
    with pytest.raises(ModelMismatch, match="ingest.reembed"):
        catalog.vectors.ensure_ready()
    catalog.close()
    _release_lite_file(settings)

    args = [PYTHON, "-m", "ingest.reembed", "--batch-size", "4"]
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    assert process.stderr is not None
    for line in process.stderr:  # "Re-embedded N of the M images read so far"
        if "Re-embedded" in line and int(line.split("Re-embedded ")[1].split()[0]) >= 12:
            break
        assert time.monotonic() < deadline, "the re-embed never got going"
    process.send_signal(signal.SIGKILL)
    process.wait()

    rerun = run_cli(args[1:], env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"of {len(blobs)} in" in rerun.stdout and "were done before" in rerun.stdout
    done_before = int(rerun.stdout.split("(")[1].split()[0])
    assert 12 <= done_before < len(blobs), rerun.stdout

    catalog = open_catalog(settings, efficientnet_alone)
    try:
        assert catalog.vectors.count() == len(blobs)
        info = catalog.vectors.info()
        assert info.collection == settings.milvus.collection and info.model.vectors_per_image == 2
        first = catalog.metadata(content_hash(blobs[0]))
        assert (first.label, first.source, first.created_at) == ("class0", "old/0.png", 1_000_000)
        hits = catalog.search_image(blobs[7], SearchOptions(top_k=3)).hits
        assert hits[0].image.id == content_hash(blobs[7]) and hits[0].score > 0.99
        leftovers = MilvusClient(uri=settings.milvus.uri)
        # The copy model (auto: the packaged student) got its vectors in the same run.
        assert sorted(leftovers.list_collections()) == [settings.milvus.collection, copy_collection(settings.milvus.collection)]
        leftovers.close()
    finally:
        catalog.close()
        _release_lite_file(settings)
    again = run_cli(args[1:], env)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-2000:]


def _kill_after(args: list[str], env: dict[str, str], marker: str, count: int) -> None:
    """Start the job and SIGKILL it once its log says ``marker`` N with N >= count."""
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    assert process.stderr is not None
    for line in process.stderr:
        if marker in line and int(line.split(marker)[1].split()[0]) >= count:
            break
        assert time.monotonic() < deadline, f"the job never logged '{marker}'"
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_copy_vectors_are_added_in_place_keeping_the_similarity_vectors_across_a_kill(efficientnet, both_models, tmp_path):
    """A collection made before the copy model: the re-embed writes its copy vectors only (the similarity
    vectors of an unchanged model stay as they are) and, killed half-way, the rerun finishes the job."""
    import random

    rng = random.Random(8)
    makers = list(GENERATED.values())
    blobs = list({encode(makers[i % len(makers)](rng), "PNG"): None for i in range(IMAGES)})
    settings = Settings(data_dir=tmp_path / "data", model={"name": "efficientnet-lite0", "copy_name": "none"})
    catalog = open_catalog(settings, efficientnet)
    for i, data in enumerate(blobs):
        catalog.add(data, f"class{i % 3}", f"old/{i}.png")
    before = {row["key"]: row["vector"] for row in catalog.vectors._milvus().query(settings.milvus.collection, filter="", output_fields=["vector"], limit=IMAGES * 4)}
    catalog.close()
    _release_lite_file(settings)

    env = service_env(tmp_path / "data", RIS_MODEL_NAME="efficientnet-lite0", RIS_MODEL_COPY_NAME="sscd-distilled")
    args = [PYTHON, "-m", "ingest.reembed", "--batch-size", "4"]
    _kill_after(args, env, "Copy vectors written for ", 12)

    rerun = run_cli(args[1:], env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Re-embedded 0 images" in rerun.stdout, "the similarity vectors are kept"
    added = int(rerun.stdout.split("Added copy vectors for ")[1].split()[0])
    assert 0 < added <= len(blobs) - 12, rerun.stdout

    both = Settings(data_dir=tmp_path / "data", model={"name": "efficientnet-lite0", "copy_name": "sscd-distilled"})
    catalog = open_catalog(both, both_models)
    try:
        assert catalog.vectors.count() == len(blobs) and catalog.copies.count() == len(blobs)
        assert catalog.complete_ids([content_hash(b) for b in blobs]) == {content_hash(b) for b in blobs}
        after = {row["key"]: row["vector"] for row in catalog.vectors._milvus().query(both.milvus.collection, filter="", output_fields=["vector"], limit=IMAGES * 4)}
        assert after.keys() == before.keys() and all(after[k] == before[k] for k in before), "similarity rows untouched"
        hits = catalog.search_image(blobs[7], SearchOptions(top_k=3, mode="copies")).hits
        assert hits[0].image.id == content_hash(blobs[7]) and hits[0].verdict == "same-image"
        assert catalog.copies.get([content_hash(blobs[7])])[0].label == "class1"
    finally:
        catalog.close()
        _release_lite_file(both)
    again = run_cli(args[1:], env)
    assert again.returncode == 0 and "Added copy vectors" not in again.stdout, again.stdout
