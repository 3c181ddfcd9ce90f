"""A client generated from the service's OpenAPI document (openapi-python-client): it generates without a
warning, has a module per tag and a function per operation id, and a search, an insert and a walk through
the gallery's pages work through it against the real service."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bento.core.ids import content_hash
from ingest.demo import encode
from tests.support import PYTHON

GENERATOR = Path(PYTHON).parent / "openapi-python-client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    import service

    root = tmp_path_factory.mktemp("generated-client")
    (root / "openapi.json").write_text(json.dumps(service.app.openapi()))
    env = {**os.environ, "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(GENERATOR), "generate", "--path", "openapi.json", "--meta", "none", "--output-path", "ris_client"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0 and "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("ris_client")
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "ris_client" or m.startswith("ris_client.")]:
            del sys.modules[name]


def test_the_client_has_a_module_per_tag_and_a_function_per_operation(generated):
    expected = {
        "search": {"search_upload", "search_url", "search_id"},
        "collection": {"insert", "gallery", "get_image", "get_thumbnail", "get_metadata", "delete_image", "labels", "duplicates"},
        "operations": {"status", "model", "rebuild_index", "embed"},
    }
    for tag, operations in expected.items():
        for operation in operations:
            module = importlib.import_module(f"ris_client.api.{tag}.{operation}")
            assert callable(module.sync) and callable(module.sync_detailed), f"{tag}.{operation}"
    from ris_client.models import BodyInsert
    from ris_client.types import File

    assert BodyInsert.__annotations__["file"] in (File, "File"), "an upload is a file, not a string"


def test_search_insert_and_pages_through_the_generated_client(generated, live_service, photo_set):
    from ris_client import Client
    from ris_client.api.collection import delete_image, gallery, insert
    from ris_client.api.search import search_upload
    from ris_client.models import BodyInsert, BodySearchUpload, GalleryPage, InsertResponse, SearchResponse
    from ris_client.types import File

    client = Client(base_url=live_service.url, timeout=120.0)  # no key: loopback, no keys configured
    fresh = encode(Image.open(io.BytesIO(photo_set["originals"]["coffee"])).convert("RGB").rotate(90, expand=True))
    image_id = content_hash(fresh)

    def upload() -> File:
        return File(payload=io.BytesIO(fresh), file_name="coffee-turned.jpg", mime_type="image/jpeg")

    added = insert.sync_detailed(client=client, body=BodyInsert(file=upload(), label="generated client"))
    assert added.status_code == 201 and isinstance(added.parsed, InsertResponse) and added.parsed.id == image_id
    try:
        found = search_upload.sync(client=client, body=BodySearchUpload(file=upload(), top_k=2))
        assert isinstance(found, SearchResponse) and found.hits[0].id == image_id and found.hits[0].score > 0.99
        pages, offset, seen = 0, 0, []
        deadline = time.monotonic() + 120
        while offset is not None and pages < 3:
            page = gallery.sync(client=client, limit=2, offset=offset)
            assert isinstance(page, GalleryPage)
            if page.state != "ready":  # 202 while the listing is first read
                assert time.monotonic() < deadline
                time.sleep(0.5)
                continue
            seen += [card.id for card in page.images]
            offset, pages = (page.next_offset if page.has_more else None), pages + 1
        assert seen[0] == image_id and len(seen) == len(set(seen)) >= 2  # newest first, pages do not overlap
    finally:
        assert delete_image.sync_detailed(client=client, image_id=image_id).status_code == 200
