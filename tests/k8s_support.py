"""Shared by the Kubernetes manifest tests (tests/test_k8s_*.py): what is rendered, how (`kubectl kustomize`,
offline), and the helpers that look inside a rendering. The `rendered` and `rendered_dir` fixtures
(tests/conftest.py) are built with render_all and write_renderings, once per session.

CRD objects (KEDA ScaledObject, Prometheus Operator ServiceMonitor, Milvus Operator Milvus) have no
schema offline: kubernetes-validate only warns on them, so write_renderings splits them off and the tests
check their required fields by hand. Everything else is validated strictly against Kubernetes' schemas.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT

K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
# The bento's two images (k8s/components/bento-image): CUDA/PyTorch for the GPU embedder, the CPU image
# (OpenVINO, no PyTorch) for everything else.
BENTO_IMAGE = "reverse-image-search"
BENTO_CPU_IMAGE = "reverse-image-search-cpu"
BENTO_IMAGES = {BENTO_IMAGE, BENTO_CPU_IMAGE}

# Every kustomization a user applies (k8s/secrets is rendered from its examples, see render_all).
RENDERED = [
    "namespace",
    "overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster", "jobs/ingest", "jobs/ingest-minio",
    "jobs/backup", "jobs/backup-milvus-cluster", "jobs/restore",
]
WORKLOADS = ["overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster"]
INGEST = ["jobs/ingest", "jobs/ingest-minio"]
BACKUP = ["jobs/backup", "jobs/backup-milvus-cluster", "jobs/restore"]
# Schema-less custom resources and their owners (checked by hand in tests/test_k8s_manifests.py).
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule", "Milvus"}


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    return "/usr/local/bin/kubectl" if os.access("/usr/local/bin/kubectl", os.X_OK) else None


KUBECTL = _kubectl()
# Every test_k8s_* module is marked with it (`pytestmark = requires_kubectl`).
requires_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (needed for `kubectl kustomize`)")


def tool(name: str) -> str:
    # checkov pins networkx<2.7 (clashes with scikit-image): scripts/test.sh gives it its own venv.
    candidates = [BIN / name, ROOT / ".venv-checkov" / "bin" / name]
    found = next((str(p) for p in candidates if p.exists()), None) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: run scripts/test.sh (it installs the test extras and .venv-checkov).")
    return found


def kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_all(secrets: Path) -> dict[str, list[dict[str, Any]]]:
    """Every rendering by name (RENDERED, "secrets", "milvus-cluster"); ``secrets`` is an empty scratch folder."""
    out = {name: kustomize(K8S / name) for name in RENDERED}
    # k8s/secrets reads git-ignored files (*.env, ris-api-keys); render a copy made from the committed examples.
    shutil.copy(K8S / "secrets" / "kustomization.yaml", secrets)
    for example in (K8S / "secrets").glob("*.example"):
        shutil.copy(example, secrets / example.name.removesuffix(".example"))
    out["secrets"] = kustomize(secrets)
    out["milvus-cluster"] = [d for d in yaml.safe_load_all((K8S / "milvus-cluster" / "milvus-operator.yaml").read_text()) if d]
    return out


def write_renderings(rendered: dict[str, list[dict[str, Any]]], folder: Path) -> Path:
    """Built-in kinds and CRD objects of every rendering, in separate files under ``folder`` (CRDs in crd/)."""
    for name, docs in rendered.items():
        stem = name.replace("/", "-")
        builtin = [d for d in docs if d["kind"] not in CRD_KINDS]
        crds = [d for d in docs if d["kind"] in CRD_KINDS]
        if builtin:
            (folder / f"{stem}.yaml").write_text(yaml.safe_dump_all(builtin))
        if crds:
            (folder / "crd").mkdir(exist_ok=True)
            (folder / "crd" / f"{stem}.yaml").write_text(yaml.safe_dump_all(crds))
    return folder


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_templates(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment, StatefulSet, Job and CronJob."""
    return [
        (d, d["spec"]["jobTemplate"]["spec"]["template"] if d["kind"] == "CronJob" else d["spec"]["template"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")
    ]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The container's environment: name -> {'value': ...} or {'secret': (name, key)} or {'configmap': ...}."""
    env: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        maps = find(docs, "ConfigMap", ref)
        assert maps, f"envFrom refers to ConfigMap {ref}, which is not rendered here"
        env.update({k: {"value": v} for k, v in maps[0].get("data", {}).items()})
    for item in container.get("env", []):
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = {"value": item.get("value", "")}
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[item["name"]] = {"secret": (ref["name"], ref["key"]), "optional": ref.get("optional", False)}
        else:
            env[item["name"]] = {"other": source}
    return env


def rendering_context(rendered: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    """What a rendering runs beside: the ingest Jobs are applied next to the workloads (ris-settings)."""
    return rendered[name] + (rendered["overlays/cpu"] if name in INGEST + BACKUP else [])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def image_name(image: str) -> str:
    return image.split("/")[-1].split(":")[0]


def bento_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (w["metadata"]["name"], c)
        for w, t in pod_templates(docs)
        for c in t["spec"]["containers"]
        if image_name(c["image"]) in BENTO_IMAGES
    ]


ROUTE_DECORATORS = {"get", "post", "put", "patch", "delete", "head", "options", "api_route"}


def service_routes() -> tuple[list[tuple[str, str, set[str]]], set[str]]:
    """service.py's FastAPI routes as (METHOD, path, scopes its handler requires), and its other paths
    (mounts, the docs and the OpenAPI schema), read from the source: service.py's route decorators and what
    the HTTP edge (the modules of bento/http/) puts on the app: the routes it adds last (/metrics, the
    catch-all), its mounts, and the docs and schema URLs it makes the app with."""
    sources = [ROOT / "service.py", *sorted((ROOT / "bento" / "http").glob("*.py"))]
    trees = [ast.parse(path.read_text()) for path in sources]
    routes: list[tuple[str, str, set[str]]] = []
    other: set[str] = set()
    scope_of = {"Searcher": "search", "Writer": "write", "Admin": "admin"}
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "app.add_api_route":
            methods = next(ast.literal_eval(k.value) for k in node.keywords if k.arg == "methods")
            routes += [(m, ast.literal_eval(node.args[0]), set()) for m in methods]
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "app.mount":
            other.add(ast.literal_eval(node.args[0]))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "FastAPI":
            urls = {ast.literal_eval(k.value) for k in node.keywords if k.arg in ("docs_url", "redoc_url", "openapi_url")}
            other |= urls - {None}
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        scopes = {scope_of[ast.unparse(a.annotation)] for a in params if a.annotation and ast.unparse(a.annotation) in scope_of}
        for deco in node.decorator_list:
            if (
                isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                and ast.unparse(deco.func.value) == "app" and deco.func.attr in ROUTE_DECORATORS
            ):
                path = ast.literal_eval(deco.args[0])
                if deco.func.attr == "api_route":
                    methods = next(ast.literal_eval(k.value) for k in deco.keywords if k.arg == "methods")
                else:
                    methods = [deco.func.attr.upper()]
                routes += [(m, path, scopes) for m in methods]
    return routes, other
