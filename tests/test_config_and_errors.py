"""Settings, and the mapping of domain errors to HTTP at the edge."""

import json
import re
from http import HTTPStatus
from pathlib import Path

import pytest
from bentoml.exceptions import BentoMLException

from bento import errors
from bento.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_derive_from_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.milvus_uri == str(tmp_path / "milvus.db") and settings.milvus_is_lite
    assert settings.image_store_dir == tmp_path / "images"
    assert not Settings(milvus_uri="http://127.0.0.1:19530").milvus_is_lite


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RIS_MODEL", "resnet50")
    monkeypatch.setenv("RIS_INDEX_PARAMS", '{"M": 32}')
    settings = Settings()
    assert settings.model == "resnet50" and settings.index_params == {"M": 32}
    monkeypatch.setenv("RIS_MODEL", "vgg")
    with pytest.raises(ValueError):
        Settings()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `RIS_([A-Z0-9_]+)` \|", readme, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidRequest, 400), (errors.InvalidImage, 422), (errors.UnsupportedImageFormat, 415),
        (errors.ImageTooLarge, 413), (errors.NotFound, 404), (errors.ModelMismatch, 409),
        (errors.BackendUnavailable, 503), (errors.ModelUnavailable, 503), (errors.UrlFetchFailed, 400),
    ],
)
def test_every_domain_error_has_its_status(error, status):
    assert issubclass(error, errors.SearchError) and error("x").status_code == status


def test_errors_from_dependent_services_keep_4xx_and_become_503_otherwise():
    from service import _remote_error

    body = json.dumps([{"error": "Collection 'images' holds embeddings of another model"}])
    mismatch = _remote_error(BentoMLException(body, error_code=HTTPStatus.CONFLICT), "vector-search")
    assert isinstance(mismatch, errors.ModelMismatch) and mismatch.message.startswith("Collection 'images'")
    assert isinstance(_remote_error(BentoMLException("x", error_code=HTTPStatus.NOT_FOUND), "v"), errors.NotFound)
    down = _remote_error(BentoMLException("boom", error_code=HTTPStatus.INTERNAL_SERVER_ERROR), "vector-search")
    assert isinstance(down, errors.BackendUnavailable) and "vector-search" in down.message


def test_domain_errors_cross_rpc_with_their_status():
    from service import domain_errors_as_http

    with pytest.raises(BentoMLException) as caught, domain_errors_as_http():
        raise errors.ModelMismatch("mixed models")
    assert caught.value.error_code == HTTPStatus.CONFLICT and "mixed models" in str(caught.value)


def test_bento_requirements_match_the_project_dependencies():
    """The bento installs what pyproject.toml declares: the two lists must not drift apart."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    lines = (ROOT / "requirements-bento.txt").read_text().splitlines()
    bento = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert bento == declared
