"""Settings, and the mapping of domain errors to HTTP at the edge."""

import re
from http import HTTPStatus
from pathlib import Path

import pytest
from pydantic import ValidationError

from bento.core import errors
from bento.core.config import RENAMED, Settings, check_environment, get_settings, setting_fields, settings_table
from bento.domain.schemas import ImageMetadata, Reply

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_derive_from_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.milvus.uri == str(tmp_path / "milvus.db") and settings.milvus.is_lite
    assert settings.image_store_dir == tmp_path / "images"
    assert not Settings(milvus={"uri": "http://127.0.0.1:19530"}).milvus.is_lite


def test_settings_come_from_the_environment_by_group(monkeypatch):
    monkeypatch.setenv("RIS_MODEL_NAME", "resnet50")
    monkeypatch.setenv("RIS_MILVUS_INDEX_PARAMS", '{"M": 32}')
    monkeypatch.setenv("RIS_MILVUS_DB_NAME", "images_db")
    monkeypatch.setenv("RIS_S3_SECRET_KEY", "s3cr3t")
    settings = get_settings()
    assert settings.model.name == "resnet50" and settings.milvus.index_params == {"M": 32}
    assert settings.milvus.db_name == "images_db" and settings.s3.secret_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(settings), "secrets never show in logs or reprs"
    monkeypatch.setenv("RIS_MODEL_NAME", "vgg")
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of auto, resnet50, efficientnet-lite0"):
        Settings()


def test_unknown_and_renamed_variables_are_refused_with_advice(monkeypatch):
    """A typo must not silently fall back to a default (RIS_MILVUS_URL would have written to a Lite file)."""
    monkeypatch.setenv("RIS_MILVUS_URL", "http://milvus:19530")
    monkeypatch.setenv("RIS_COLLECTION", "photos")
    with pytest.raises(ValueError) as refused:
        get_settings()
    message = str(refused.value)
    assert "RIS_MILVUS_URL (not a setting)" in message and "RIS_COLLECTION (now RIS_MILVUS_COLLECTION)" in message
    check_environment({"RIS_MILVUS_URI": "x", "RIS_DATA_DIR": "d", "PATH": "/bin"})  # known ones pass


def test_every_renamed_setting_names_an_existing_one():
    known = {name for name, _ in setting_fields()}
    assert RENAMED, "no renamed settings: nothing would be checked"
    for old, new in RENAMED.items():
        assert old not in known, f"{old} is both renamed and a setting"
        target = new.split()[0]
        assert target == "nothing:" or target in known, f"{old} -> {new}: not a setting"


def test_the_settings_page_is_the_generated_table():
    """Every setting is documented once, from its field: `ris settings` prints the table of docs/settings.md."""
    readme = (ROOT / "docs" / "settings.md").read_text()
    assert settings_table() in readme, "regenerate docs/settings.md's table: ris settings"
    documented = re.findall(r"^\| `(RIS_[A-Z0-9_]+)` \|", readme, flags=re.M)
    assert sorted(documented) == sorted(name for name, _ in setting_fields()), "each setting once, no stale rows"


def test_the_settings_page_quotes_the_refusal_of_a_renamed_setting_as_the_service_prints_it():
    page = (ROOT / "docs" / "settings.md").read_text()
    quoted = re.findall(r"`(RIS_[A-Z0-9_]+) \(now (RIS_[A-Z0-9_]+)\)`", page)
    assert quoted, "the page shows what a renamed setting's refusal looks like"
    for old, new in quoted:
        with pytest.raises(ValueError, match=re.escape(f"{old} (now {new})")):
            check_environment({old: "x"})


# Where the HTTP API answers each domain error (bento.http.errors.HTTP_STATUS, the one table at the edge).
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidRequest, 400), (errors.InvalidImage, 422), (errors.UnsupportedImageFormat, 415),
        (errors.ImageTooLarge, 413), (errors.NotFound, 404), (errors.ModelMismatch, 409),
        (errors.BackendUnavailable, 503), (errors.ModelUnavailable, 503), (errors.UrlFetchFailed, 400),
        (errors.MilvusLiteLocked, 503), (errors.ConnectionDropped, 503), (errors.SearchError, 500),
    ],
)
def test_every_domain_error_has_its_status_at_the_edge(error, status):
    from bento.http.errors import http_status

    assert http_status(error("x")) == status
    assert not hasattr(error("x"), "status_code"), "domain errors know nothing of HTTP"


def test_server_side_failures_show_their_details_to_operators_only():
    """A 5xx message names hosts, paths and causes: admins (and the logs) read it, other callers a plain
    sentence; client errors and failures marked public are always shown as they are."""
    import json

    from bento.http.errors import error_response

    def detail(error, reveal):
        return json.loads(error_response(error, reveal=reveal).body)["detail"]

    outage = errors.BackendUnavailable("Milvus at http://milvus.internal:19530 did not answer search in time")
    assert "milvus.internal" in detail(outage, reveal=True)
    hidden = detail(outage, reveal=False)
    assert "milvus.internal" not in hidden and "unavailable" in hidden
    assert "/srv" not in detail(errors.SearchError("cannot read /srv/data/x"), reveal=False)
    busy = errors.BackendUnavailable("Too many images are being decoded right now; try again in a few seconds.", public=True)
    assert detail(busy, reveal=False) == busy.message
    assert detail(errors.InvalidImage("The file is not an image."), reveal=False) == "The file is not an image."


@pytest.mark.parametrize("error", [errors.MilvusLiteLocked, errors.ModelMismatch, errors.NotFound, errors.ConnectionDropped, errors.SearchError])
def test_domain_errors_cross_a_service_boundary_as_data_and_come_out_the_same(error):
    message = "Cannot open the Milvus Lite file: Milvus Lite allows one process per file."
    reply = Reply.failed(error(message))
    crossed = Reply.model_validate_json(reply.model_dump_json())  # what travels between services
    with pytest.raises(error) as raised:
        crossed.unwrap(int)
    assert type(raised.value) is error and raised.value.message == message


def test_replies_validate_their_value_as_the_caller_expects():
    assert Reply.of(["a", "b"]).unwrap(set[str]) == {"a", "b"}
    meta = {"id": "a" * 64, "mime": "image/png", "width": 1, "height": 1, "size_bytes": 1, "created_at": 0}
    assert Reply.of([meta]).unwrap(list[ImageMetadata])[0].id == "a" * 64
    with pytest.raises(ValidationError):
        Reply.of("not a number").unwrap(int)


def test_transport_failures_of_a_dependency_become_typed_domain_errors():
    import aiohttp
    from bentoml.exceptions import BentoMLException

    from bento.adapters.remote import calling

    with pytest.raises(errors.ConnectionDropped), calling("embedder"):
        raise aiohttp.ServerDisconnectedError()
    with pytest.raises(errors.BackendUnavailable, match="vector-search service failed .*HTTP 500"), calling("vector-search"):
        raise BentoMLException("An unexpected error has occurred", error_code=HTTPStatus.INTERNAL_SERVER_ERROR)


def test_bento_requirements_match_the_project_dependencies():
    """The bento installs what pyproject.toml declares: the two lists must not drift apart."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    lines = (ROOT / "requirements-bento.txt").read_text().splitlines()
    bento = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert bento == declared


def test_settings_from_a_given_environment_ignore_this_process(monkeypatch):
    """What a process started with that environment would read: this process's RIS_* never leak in."""
    from bento.core.config import settings_from

    monkeypatch.setenv("RIS_MILVUS_URI", "http://from-this-process:19530")
    settings = settings_from({"RIS_DATA_DIR": "/srv/ris", "RIS_MODEL_NAME": "resnet50", "PATH": "/bin"})
    assert settings.model.name == "resnet50" and settings.milvus.uri == "/srv/ris/milvus.db"
    with pytest.raises(ValueError, match="RIS_COLLECTION \\(now RIS_MILVUS_COLLECTION\\)"):
        settings_from({"RIS_COLLECTION": "photos"})


def test_views_are_checked_and_spelled_one_way():
    assert Settings(model={"views": " crops-60 , low-res-64"}).model.views == "low-res-64,crops-60"
    assert Settings(model={"views": ""}).model.view_sets == ()
    for bad in ("thumbnails", "low-res-64,low-res-64", "auto,crops-60"):
        with pytest.raises(ValueError, match="at most once"):
            Settings(model={"views": bad})
    with pytest.raises(ValueError, match="at most once"):
        Settings(model={"copy_views": "auto"})  # the copy model's views have no auto


def test_the_low_res_view_is_stored_by_default_only_where_no_copy_model_finds_thumbnails():
    assert Settings().model.views == "auto" and Settings().model.view_sets == ()
    assert Settings(model={"copy_name": "none"}).model.view_sets == ("low-res-64",)
    assert Settings(model={"copy_name": "none", "views": ""}).model.view_sets == ()
    assert Settings(model={"views": "low-res-64"}).model.view_sets == ("low-res-64",)
