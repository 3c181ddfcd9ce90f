"""The API contract clients generate code from: explicit operation ids, tags, the key schemes, every error
status an operation answers documented with the one error body; unknown query parameters refused, not
ignored; a 405 says what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from fastapi import Form, Query
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def spec():
    import service

    return service.app.openapi()


def _operations(spec):
    return [(method, path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_operation_ids_are_the_routes_names_and_each_has_a_tag(spec):
    import ast

    tree = ast.parse((ROOT / "service.py").read_text())
    handlers = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    operations = _operations(spec)
    assert len(operations) >= 15
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids)) and set(ids) <= handlers, sorted(set(ids) - handlers)
    assert {"search_upload", "search_url", "search_id", "insert", "gallery", "status"} <= set(ids)
    declared = {tag["name"] for tag in spec["tags"]}
    for _, path, op in operations:
        assert len(op["tags"]) == 1 and op["tags"][0] in declared, path
    assert {op["tags"][0] for _, p, op in operations if p.startswith("/api/search")} == {"search"}


def test_every_error_status_is_documented_with_the_one_error_body(spec):
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(spec["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error", "detail", "errors"}
    assert "HTTPValidationError" not in str(spec), "FastAPI's own 422 body is never sent"
    for method, path, op in _operations(spec):
        statuses = {int(s): r for s, r in op["responses"].items()}
        assert {401, 403, 503} <= set(statuses), (method, path)
        for status, response in statuses.items():
            if status >= 400:
                assert response["content"]["application/json"]["schema"] == error, (method, path, status)
    by_id = {op["operationId"]: {int(s) for s in op["responses"]} for _, _, op in _operations(spec)}
    assert {413, 415, 422} <= by_id["search_upload"] and 429 in by_id["search_url"] and 404 in by_id["get_image"]


def _answer_properties(spec):
    """(schema, property, definition) of every property of every schema an answer uses."""
    schemas = spec["components"]["schemas"]
    for name, schema in schemas.items():
        for prop, definition in schema.get("properties", {}).items():
            yield name, prop, definition


def _types(definition) -> set[str]:
    options = definition.get("anyOf", [definition])
    return {option.get("type", "") for option in options} | {option.get("format", "") for option in options}


def test_one_name_per_concept_and_one_form_of_a_time(spec):
    """A number of images is `image_count` wherever it appears, a list's length `total`; a point in time is
    an ISO 8601 string, a duration a number in milliseconds with `_ms` in its name."""
    seen = list(_answer_properties(spec))
    assert len(seen) > 100
    for schema, prop, definition in seen:
        where = f"{schema}.{prop}"
        assert prop not in {"count", "images_count", "total_groups", "collection_count"}, where
        if prop == "images":
            assert "array" in _types(definition), f"{where}: a number of images is image_count"
        if prop.endswith("_at") or prop == "as_of":
            assert "date-time" in _types(definition), f"{where}: times are ISO 8601"
        assert not prop.endswith(("_seconds", "_s")) and prop != "seconds", f"{where}: durations are *_ms"
    names = {(schema, prop) for schema, prop, _ in seen}
    for schema in ("StatusResponse", "LabelList", "LabelCount", "DuplicateReport"):
        assert (schema, "image_count") in names, schema
    assert {("GalleryPage", "total"), ("DuplicatePage", "total"), ("DuplicateReport", "compare_ms")} <= names
    # Every list and search pages the same way.
    for page in ("GalleryPage", "DuplicatePage", "SearchResponse", "LabelList"):
        assert {(page, "has_more"), (page, "next_offset"), (page, "offset")} <= names, page
    lists = {op["operationId"]: {p["name"] for p in op.get("parameters", []) if p["in"] == "query"} for _, _, op in _operations(spec)}
    for operation in ("gallery", "labels", "duplicates"):
        assert {"offset", "limit"} <= lists[operation], operation


@pytest.fixture(scope="module")
def client():
    from bento.core.config import Settings
    from bento.http.app import add_last_routes, make_app

    app, _ = make_app(Settings(data_dir=Path("unused")), ROOT / "bento" / "static")

    @app.post("/api/search")
    def upload(self=None, top_k: Annotated[int, Form()] = 12) -> dict[str, int]:  # noqa: ANN001 (as a BentoML class view)
        return {"top_k": top_k}

    @app.get("/api/images")
    def gallery(limit: Annotated[int, Query(ge=1)] = 10, offset: int = 0) -> dict[str, int]:
        return {"limit": limit, "offset": offset}

    add_last_routes(app)
    with TestClient(app) as client:
        yield client


def test_an_unknown_query_parameter_is_refused_not_ignored(client):
    # top_k is a form field of the upload search: in the query string it used to be ignored silently.
    refused = client.post("/api/search?top_k=3", data={})
    assert refused.status_code == 422 and refused.json()["error"] == "validation_error"
    assert "top_k" in refused.json()["detail"] and "takes none" in refused.json()["detail"]
    assert client.post("/api/search", data={"top_k": "3"}).json() == {"top_k": 3}
    assert client.get("/api/images?limit=5&offset=2").json() == {"limit": 5, "offset": 2}
    typo = client.get("/api/images?limt=5")
    assert typo.status_code == 422 and "limt" in typo.json()["detail"] and "limit, offset" in typo.json()["detail"]
    assert typo.json()["errors"] == [{"location": "query", "field": "limt", "message": "not a parameter of this operation"}]
    # Pages that are not the API are lenient (a browser may add tracking parameters to /docs).
    assert client.get("/docs?utm_source=x").status_code == 200


def test_a_validation_error_lists_each_field_and_other_errors_carry_no_list(client):
    bad = client.get("/api/images?limit=0&offset=x")
    body = bad.json()
    assert bad.status_code == 422 and body["error"] == "validation_error"
    assert {(e["location"], e["field"]) for e in body["errors"]} == {("query", "limit"), ("query", "offset")}
    assert all(e["message"] for e in body["errors"]) and "query.limit" in body["detail"]
    assert "errors" not in client.get("/no/such/route").json(), "only a 422 has a field list"


def test_a_wrong_method_is_405_with_allow(client):
    answer = client.put("/api/images")
    assert answer.status_code == 405 and answer.json()["error"] == "method_not_allowed"
    assert answer.headers["allow"] == "GET"
    assert client.get("/no/such/route").status_code == 404
