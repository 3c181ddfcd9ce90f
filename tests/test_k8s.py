"""Kubernetes manifests (k8s/): render offline, validate, enforce security checks, check the wiring.

CRD objects (KEDA ScaledObject, Prometheus Operator ServiceMonitor, Milvus Operator Milvus) have no
schema offline: kubernetes-validate only warns on them, so they are split off and their required
fields are checked here by hand. Everything else is validated strictly against Kubernetes' schemas.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bento.core.config import setting_fields, settings_from
from bento.core.metrics import INTERNAL, LABELS, UNMATCHED

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
# The bento's two images (k8s/components/bento-image): CUDA/PyTorch for the GPU embedder, the CPU image
# (OpenVINO, no PyTorch) for everything else.
BENTO_IMAGE = "reverse-image-search"
BENTO_CPU_IMAGE = "reverse-image-search-cpu"
BENTO_IMAGES = {BENTO_IMAGE, BENTO_CPU_IMAGE}

# Every kustomization a user applies (k8s/secrets is rendered from its examples, see below).
RENDERED = [
    "namespace",
    "overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster", "jobs/ingest", "jobs/ingest-minio",
]
WORKLOADS = ["overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster"]
INGEST = ["jobs/ingest", "jobs/ingest-minio"]
NAMESPACE = "ris"
# The one kustomize Component naming the bento image (k8s/base and k8s/jobs/ingest include it).
IMAGE_COMPONENT = "components/bento-image"
# Schema-less custom resources and their owners (checked by hand below).
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "Milvus"}
# The oldest and the newest Kubernetes the manifests are validated against (Indexed Job with
# backoffLimitPerIndex and podFailurePolicy FailIndex need 1.29+; kubectl here renders as 1.32).
K8S_VERSIONS = ["1.30.0", "1.37.0"]

# Checkov checks enforced (k8s/README.md lists them with their names). Skips are global (below) or per
# resource through `checkov.io/skipN` annotations, each with its reason; ALLOWED_SKIPS bounds them.
ENFORCED_CHECKS = [
    "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13", "CKV_K8S_14",
    "CKV_K8S_16", "CKV_K8S_17", "CKV_K8S_18", "CKV_K8S_19", "CKV_K8S_20", "CKV_K8S_21", "CKV_K8S_22",
    "CKV_K8S_23", "CKV_K8S_25", "CKV_K8S_26", "CKV_K8S_27", "CKV_K8S_28", "CKV_K8S_29", "CKV_K8S_30",
    "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_38", "CKV_K8S_39", "CKV_K8S_40", "CKV_K8S_41", "CKV_K8S_116",
    "CKV_K8S_117", "CKV_K8S_118", "CKV_K8S_119", "CKV_K8S_152", "CKV_K8S_153", "CKV_K8S_154", "CKV2_K8S_6",
]
ALLOWED_SKIPS = {
    "CKV_K8S_40": {"ris-api", "ris-embedder", "ris-ingest"},  # the bento image's own uid 1034
    "CKV_K8S_22": {"ris-milvus"},  # Milvus' root filesystem not verified read-only
    "CKV_K8S_116": {"ris-etcd"}, "CKV_K8S_117": {"ris-etcd"}, "CKV_K8S_119": {"ris-etcd"},  # etcd TLS
}


def _kubectl() -> str | None:
    found = shutil.which("kubectl")
    if found:
        return found
    return "/usr/local/bin/kubectl" if os.access("/usr/local/bin/kubectl", os.X_OK) else None


KUBECTL = _kubectl()
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (needed for `kubectl kustomize`)")


def _tool(name: str) -> str:
    # checkov pins networkx<2.7 (clashes with scikit-image): scripts/test.sh gives it its own venv.
    candidates = [BIN / name, ROOT / ".venv-checkov" / "bin" / name]
    found = next((str(p) for p in candidates if p.exists()), None) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: run scripts/test.sh (it installs the test extras and .venv-checkov).")
    return found


def _kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = {name: _kustomize(K8S / name) for name in RENDERED}
    # k8s/secrets reads git-ignored files (*.env, ris-api-keys); render a copy made from the committed examples.
    secrets = tmp_path_factory.mktemp("secrets")
    shutil.copy(K8S / "secrets" / "kustomization.yaml", secrets)
    for example in (K8S / "secrets").glob("*.example"):
        shutil.copy(example, secrets / example.name.removesuffix(".example"))
    out["secrets"] = _kustomize(secrets)
    out["milvus-cluster"] = [d for d in yaml.safe_load_all((K8S / "milvus-cluster" / "milvus-operator.yaml").read_text()) if d]
    return out


@pytest.fixture(scope="module")
def rendered_dir(rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in kinds and CRD objects of every rendering, in separate files."""
    folder = tmp_path_factory.mktemp("rendered")
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


def _find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = _find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_templates(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment, StatefulSet and Job."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The container's environment: name -> {'value': ...} or {'secret': (name, key)} or {'configmap': ...}."""
    env: dict[str, dict[str, Any]] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        maps = _find(docs, "ConfigMap", ref)
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


def _context(rendered: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    """What a rendering runs beside: the ingest Jobs are applied next to the workloads (ris-settings)."""
    return rendered[name] + (rendered["overlays/cpu"] if name in INGEST else [])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _component(template: dict[str, Any]) -> str:
    return template["metadata"]["labels"]["app.kubernetes.io/component"]


# --- rendering and schemas -----------------------------------------------------------------------


def test_every_kustomization_is_rendered() -> None:
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    components = {
        str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml") if yaml.safe_load(p.read_text())["kind"] == "Component"
    }
    # Each is tested through what includes it (the gpu overlays' image test covers cuda-embedder).
    assert components == {IMAGE_COMPONENT, "overlays/gpu/cuda-embedder"}, "a new Component must be tested through what includes it"
    assert found - {"base", "secrets"} - components == set(RENDERED), "a new kustomization must be added to RENDERED"


def test_secrets_are_never_in_workload_renderings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in RENDERED:
        assert not _find(rendered[name], "Secret"), f"{name} renders a Secret: credentials belong in k8s/secrets"
    assert {d["metadata"]["name"] for d in _find(rendered["secrets"], "Secret")} == {
        "ris-minio-root", "ris-s3", "ris-milvus-s3", "ris-api-keys", "ris-ingest-key",
    }
    for real in ("k8s/secrets/ris-s3.env", "k8s/secrets/ris-ingest-key.env", "k8s/secrets/ris-api-keys"):
        ignored = subprocess.run(["git", "check-ignore", "-q", real], cwd=ROOT, capture_output=True, timeout=30)
        assert ignored.returncode == 0, f"{real} must be git-ignored (real credentials)"
    for committed in ("k8s/secrets/kustomization.yaml", "k8s/secrets/ris-api-keys.example", "k8s/secrets/ris-s3.env.example"):
        ignored = subprocess.run(["git", "check-ignore", "-q", committed], cwd=ROOT, capture_output=True, timeout=30)
        assert ignored.returncode == 1, f"{committed} must not be git-ignored"


def test_no_credentials_in_manifests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    secretish = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN|CLIENT_KEY|AUTH_KEYS$)", re.I)
    for name in RENDERED:
        for _, template in _pod_templates(rendered[name]):
            for container in _containers(template):
                for var, how in _env(container, _context(rendered, name)).items():
                    assert not (secretish.search(var) and "value" in how), f"{name}: {var} must come from a Secret"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_pass_strict_schema_validation(rendered_dir: Path, version: str) -> None:
    files = sorted(str(p) for p in rendered_dir.glob("*.yaml"))
    done = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *files],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Couldn't find schema" not in done.stdout + done.stderr, "a non-CRD kind has no schema"


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The validator really is strict: a misspelt field fails (so the test above means something)."""
    bad = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"selector": {"a": "b"}, "ports": [{"port": 80, "targetPorrt": 3000}]},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    done = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[0], str(tmp_path / "bad.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0


def test_crd_objects_have_their_required_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    keda = rendered["overlays/keda"]
    scaled = _one(keda, "ScaledObject", "ris-embedder")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    _one(keda, target.get("kind", "Deployment"), target["name"])
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["triggers"], "a ScaledObject needs triggers"
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata values are strings"
    # KEDA owns the embedder's HPA: no second HPA may target it.
    assert not [h for h in _find(keda, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == target["name"]]
    for name in ("overlays/gpu", "overlays/keda"):
        assert _find(rendered[name], "ServiceMonitor"), f"{name}: no ServiceMonitor"
        for monitor in _find(rendered[name], "ServiceMonitor"):
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"

    (milvus,) = rendered["milvus-cluster"]
    assert milvus["apiVersion"] == "milvus.io/v1beta1" and milvus["kind"] == "Milvus"
    assert milvus["spec"]["mode"] == "cluster"
    assert {"etcd", "storage"} <= set(milvus["spec"]["dependencies"])
    values = yaml.safe_load((K8S / "milvus-cluster" / "values.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    assert values["image"]["all"]["tag"] == milvus["spec"]["components"]["image"].split(":")[1]


# --- security --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(rendered_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [_tool("checkov"), "-d", str(rendered_dir), "--framework", "kubernetes", "--check", ",".join(ENFORCED_CHECKS),
         "-o", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(done.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_enforced_checks_pass(checkov_report: dict[str, Any]) -> None:
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in checkov_report["results"]["failed_checks"]
    ]
    assert not failed, "checkov failures:\n" + "\n".join(failed)


def test_checkov_every_enforced_check_ran_and_skips_are_justified(checkov_report: dict[str, Any]) -> None:
    results = checkov_report["results"]
    seen = {c["check_id"] for c in results["passed_checks"] + results["skipped_checks"]}
    assert set(ENFORCED_CHECKS) <= seen, f"never evaluated: {sorted(set(ENFORCED_CHECKS) - seen)}"
    for skip in results["skipped_checks"]:
        resource = skip["resource"].split(".")[-1]
        assert resource in ALLOWED_SKIPS.get(skip["check_id"], set()), f"unexpected skip {skip['check_id']} on {resource}"
        assert skip["check_result"].get("suppress_comment"), f"{skip['check_id']} on {resource} is skipped without a reason"


def test_pods_are_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in RENDERED:
        for workload, template in _pod_templates(rendered[name]):
            where = f"{name} {workload['kind']}/{workload['metadata']['name']}"
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["serviceAccountName"] != "default", where
            for container in _containers(template):
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert "add" not in context["capabilities"], where
                if workload["metadata"]["name"] != "ris-milvus":
                    assert context["readOnlyRootFilesystem"] is True, where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
                assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where


def _allowed_sources(policies: list[dict[str, Any]], target: dict[str, Any], port: str) -> list[dict[str, Any]]:
    labels = target["metadata"]["labels"]
    sources: list[dict[str, Any]] = []
    for policy in policies:
        if not _matches(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            if any(p["port"] == port for p in rule.get("ports", [{"port": port}])):
                sources.extend(rule.get("from", [{}]))
    return sources


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu", "overlays/keda"])
def test_network_policies_admit_only_the_api_and_ingest_to_milvus_and_minio(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    policies = _find(docs, "NetworkPolicy")
    deny = _one(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    pods = [t for _, t in _pod_templates(docs + rendered["jobs/ingest"])]

    def who_reaches(component: str, port: str) -> set[str]:
        target = next(t for t in pods if _component(t) == component)
        reach: set[str] = set()
        for source in _allowed_sources(policies, target, port):
            assert source, f"{component}:{port} is open to everything"
            if "podSelector" in source and "namespaceSelector" not in source:
                reach |= {_component(t) for t in pods if _matches(source["podSelector"]["matchLabels"], t["metadata"]["labels"])}
            else:
                reach.add("namespace:" + source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        return reach

    assert who_reaches("milvus", "grpc") == {"api", "ingest"}
    assert who_reaches("minio", "s3") == {"api", "ingest", "milvus", "minio-setup"}
    assert who_reaches("etcd", "client") == {"milvus"}
    assert who_reaches("embedder", "http") == {"api", "namespace:monitoring"}


# --- wiring: settings, ports, probes, images ---------------------------------------------------------


def _image_name(image: str) -> str:
    return image.split("/")[-1].split(":")[0]


def _bento_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (w["metadata"]["name"], c)
        for w, t in _pod_templates(docs)
        for c in t["spec"]["containers"]
        if _image_name(c["image"]) in BENTO_IMAGES
    ]


def test_every_ris_variable_is_a_settings_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = {env_name for env_name, _ in setting_fields()}
    names: set[str] = set()
    for name in RENDERED:
        for _, template in _pod_templates(rendered[name]):
            for container in _containers(template):
                names |= {v for v in _env(container, _context(rendered, name)) if v.startswith("RIS_")}
    for secret in _find(rendered["secrets"], "Secret"):
        names |= {k for k in secret.get("data", {}) if k.startswith("RIS_")}
    assert names, "no RIS_ settings found"
    unknown = sorted(n for n in names if n not in known)
    assert not unknown, f"not settings of bento.core.config.Settings: {unknown}"


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_api_has_the_settings_a_deployment_needs(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    api = next(c for w, c in _bento_containers(docs) if w == "ris-api")
    env = _env(api, docs)
    value = {k: v["value"] for k, v in env.items() if "value" in v}
    secrets = {s["metadata"]["name"]: set(s["data"]) for s in _find(rendered["secrets"], "Secret")}

    assert value["RIS_STORE_BACKEND"] == "s3"
    assert value["RIS_S3_BUCKET"]
    for key in ("RIS_S3_ACCESS_KEY", "RIS_S3_SECRET_KEY"):
        secret, secret_key = env[key]["secret"]
        assert secret_key in secrets[secret], f"{key}: Secret {secret} has no key {secret_key}"
    minio_host, minio_port = value["RIS_S3_ENDPOINT"].split(":")
    minio = _one(docs, "Service", minio_host)
    assert int(minio_port) in {p["port"] for p in minio["spec"]["ports"]}

    milvus_uri = value["RIS_MILVUS_URI"]
    assert milvus_uri.startswith("http://"), "the API needs a Milvus server (Lite is one process per file)"
    milvus_host, milvus_port = milvus_uri.removeprefix("http://").split(":")
    if "." not in milvus_host:  # in this namespace: the Service must be rendered here
        assert int(milvus_port) in {p["port"] for p in _one(docs, "Service", milvus_host)["spec"]["ports"]}
    else:
        assert overlay == "overlays/gpu-milvus-cluster" and milvus_host == "ris-milvus.milvus"

    embedder_host, embedder_port = value["RIS_SERVICES_EMBEDDER_URL"].removeprefix("http://").split(":")
    embedder_service = _one(docs, "Service", embedder_host)
    assert embedder_service["spec"]["selector"]["app.kubernetes.io/component"] == "embedder"
    assert int(embedder_port) in {p["port"] for p in embedder_service["spec"]["ports"]}

    # The resolved environment builds a valid Settings object (secrets replaced by placeholders), with the
    # refusals the product makes at start.
    settings = settings_from({key: how.get("value", "placeholder") for key, how in env.items() if not how.get("optional")})
    assert settings.store.backend == "s3" and not settings.milvus.is_lite and settings.services.embedder_url


def test_services_target_declared_container_ports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in WORKLOADS:
        docs = rendered[name]
        for service in _find(docs, "Service"):
            pods = [t for _, t in _pod_templates(docs) if _matches(service["spec"]["selector"], t["metadata"]["labels"])]
            assert pods, f"{name}: Service {service['metadata']['name']} selects no pod"
            for port in service["spec"]["ports"]:
                for template in pods:
                    declared = {(p.get("name"), p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports", [])}
                    target = port["targetPort"]
                    assert any(target in pair for pair in declared), f"{name}: {service['metadata']['name']}:{target}"
        for ingress in _find(docs, "Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    service = _one(docs, "Service", backend["name"])
                    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def _bentoml_system_routes() -> set[str]:
    """The paths BentoML itself serves next to the service's own routes (/livez, /readyz, /metrics...)."""
    from types import SimpleNamespace

    from bentoml._internal.server.base_app import BaseAppFactory

    def endpoint(_: object) -> None:
        return None

    stub = SimpleNamespace(livez=endpoint, readyz=endpoint, metrics=endpoint)
    return {route.path for route in BaseAppFactory.get_system_routes(stub)}  # type: ignore[arg-type]


def _service_names() -> dict[str, str]:
    """class name -> BentoML service name, from the @bentoml.service decorators of service.py."""
    tree = ast.parse((ROOT / "service.py").read_text())
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "bentoml.service":
                    names[node.name] = next(ast.literal_eval(k.value) for k in deco.keywords if k.arg == "name")
    return names


def test_probes_hit_endpoints_the_bento_serves(rendered: dict[str, list[dict[str, Any]]]) -> None:
    routes = _bentoml_system_routes()
    assert {"/livez", "/readyz", "/metrics"} <= routes
    # The API pod also serves service.py's own routes (its FastAPI app), among them /ready: whether
    # this pod can serve (Milvus, MinIO), without BentoML's /readyz's dependency on the embedder.
    api_routes = routes | {p for m, p, _ in _service_routes()[0] if m == "GET"}
    assert "/ready" in api_routes, "service.py serves no GET /ready (the API's readinessProbe)"
    served = {"ris-api": api_routes, "ris-embedder": routes}
    expected_readiness = {"ris-api": "/ready", "ris-embedder": "/readyz"}
    for name in WORKLOADS:
        for workload, container in _bento_containers(rendered[name]):
            ports = {p["name"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] in served[workload], f"{name} {workload} {probe}: {get['path']}"
                assert get["port"] in ports and get["port"] == "http"
            # Readiness: the API's own /ready in every overlay (no overlay may swap it for a workaround);
            # liveness stays on /livez (a dependency outage must not restart the pod).
            assert container["readinessProbe"]["httpGet"]["path"] == expected_readiness[workload], f"{name} {workload}"
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez", f"{name} {workload}"
            # Realistic start-up allowance: model load, warm-up, CUDA init, a cold image cache.
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # /metrics: BentoML's in the embedder; in the API, BentoML's request metrics and route are off
    # (service.py: metrics={"enabled": False}) and the app serves its own.
    api_own = {p for m, p, _ in _service_routes()[0] if m == "GET"}
    assert "/metrics" in api_own, "service.py serves no GET /metrics (BentoML's is off for the API)"
    for template in ("overlays/gpu", "overlays/keda"):
        for monitor in _find(rendered[template], "ServiceMonitor"):
            for endpoint in monitor["spec"]["endpoints"]:
                if monitor["metadata"]["name"] != "ris-milvus":
                    assert endpoint["path"] in api_own and endpoint["path"] in routes, endpoint["path"]


def test_embedder_deployment_serves_the_embedder_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = _service_names()
    assert {"Embedder", "ImageSearch"} <= set(names)
    for name in WORKLOADS:
        embedder = next(c for w, c in _bento_containers(rendered[name]) if w == "ris-embedder")
        args = embedder["args"]
        assert args[0] == "start-http-server"
        assert args[args.index("--service-name") + 1] == names["Embedder"]
    # Queries that name BentoML services (runner_name) must name real ones.
    rules = (K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text()
    scaled = (K8S / "overlays" / "keda" / "scaledobject.yaml").read_text()
    for runner in re.findall(r'runner_name=~?"([^"]+)"', rules + scaled):
        assert set(runner.split("|")) <= set(names.values()), runner


def test_gpu_overlay_puts_the_embedder_on_a_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster"):
        docs = rendered[name]
        deployment = _one(docs, "Deployment", "ris-embedder")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert deployment["spec"]["template"]["spec"]["nodeSelector"]
        assert _env(container, docs)["RIS_MODEL_DEVICE"]["value"] == "cuda"
        api = _one(docs, "Deployment", "ris-api")["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in api["resources"]["limits"]
    cpu = _one(rendered["overlays/cpu"], "Deployment", "ris-embedder")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"] and "nodeSelector" not in cpu


def test_every_deployment_scales_and_has_a_disruption_budget(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in WORKLOADS:
        docs = rendered[name]
        scalers = {h["spec"]["scaleTargetRef"]["name"]: h for h in _find(docs, "HorizontalPodAutoscaler")}
        scalers |= {s["spec"]["scaleTargetRef"]["name"]: s for s in _find(docs, "ScaledObject")}
        for deployment in _find(docs, "Deployment"):
            dep = deployment["metadata"]["name"]
            assert dep in scalers, f"{name}: no autoscaler for {dep}"
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert any(_matches(p["spec"]["selector"]["matchLabels"], labels) for p in _find(docs, "PodDisruptionBudget"))
            hpa = scalers[dep]
            if hpa["kind"] == "HorizontalPodAutoscaler":
                kinds = [m["type"] for m in hpa["spec"]["metrics"]]
                assert "Resource" in kinds, "CPU is the fallback metric"
                if name != "overlays/cpu":
                    assert kinds[0] == "Pods" and hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "ris_in_flight_requests"
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    assert [r["name"]["as"] for r in rules["rules"]["custom"]] == ["ris_in_flight_requests"]


def test_images_are_consistent_and_pinned(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The Jobs are applied on their own next to whichever overlay runs: every rendering must name the
    # bento images alike, from a registry (a bare `reverse-image-search` is pulled from Docker Hub's
    # library namespace: ImagePullBackOff on a real cluster). Only a GPU embedder runs the CUDA image.
    images: dict[str, str] = {}
    for name in WORKLOADS + INGEST:
        found = _bento_containers(rendered[name])
        assert found, f"{name}: no container runs a bento image"
        for workload, container in found:
            gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
            expected = BENTO_IMAGE if gpu else BENTO_CPU_IMAGE
            assert _image_name(container["image"]) == expected, f"{name}/{workload} runs {container['image']}, not {expected}"
            assert images.setdefault(expected, container["image"]) == container["image"], f"{name}: another {expected}"
    assert set(images) == BENTO_IMAGES, f"both images are deployed somewhere: {images}"
    for image in images.values():
        registry = image.split("/")[0]
        assert "/" in image and ("." in registry or ":" in registry or registry == "localhost"), f"{image}: no registry host"
    # One place sets them: the Component, included by base (every overlay), the gpu overlay (for the image
    # its cuda-embedder component switches to) and the ingest Job.
    for kustomization in K8S.rglob("kustomization.yaml"):
        where = str(kustomization.parent.relative_to(K8S))
        content = yaml.safe_load(kustomization.read_text())
        names = {i["name"] for i in content.get("images", [])}
        if where == IMAGE_COMPONENT:
            assert names == BENTO_IMAGES
        else:
            assert not names & BENTO_IMAGES, f"k8s/{where} sets a bento image: only k8s/{IMAGE_COMPONENT} may"
    for includer in ("base", "jobs/ingest", "overlays/gpu"):
        content = yaml.safe_load((K8S / includer / "kustomization.yaml").read_text())
        included = {str((K8S / includer / c).resolve().relative_to(K8S)) for c in content.get("components", [])}
        assert IMAGE_COMPONENT in included, f"k8s/{includer} does not include k8s/{IMAGE_COMPONENT}"
    for name in RENDERED:
        for _, template in _pod_templates(rendered[name]):
            for container in _containers(template):
                image = container["image"]
                assert ":" in image.split("/")[-1] and not image.endswith(":latest"), image


@pytest.mark.parametrize("job_dir", INGEST)
def test_ingest_job_is_sharded_and_wired(rendered: dict[str, list[dict[str, Any]]], job_dir: str) -> None:
    docs = rendered[job_dir]
    job = _one(docs, "Job", "ris-ingest")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:3] == ["python", "-m", "ingest"]
    shard_count = next(int(a.split("=")[1]) for a in args if a.startswith("--shard-count="))
    assert shard_count == spec["completions"] == spec["parallelism"], "shards, completions and parallelism must agree"
    assert not any(a.startswith("--shard-index") for a in args), "the shard index comes from JOB_COMPLETION_INDEX"
    cli = (ROOT / "ingest" / "__main__.py").read_text()
    assert "JOB_COMPLETION_INDEX" in cli
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert f'"{flag}"' in cli, f"python -m ingest has no {flag}"
    service_url = next(a.split("=", 1)[1] for a in args if a.startswith("--service-url="))
    api_service = _one(rendered["overlays/cpu"], "Service", service_url.removeprefix("http://").split(":")[0])
    assert api_service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    env = _env(container, rendered["overlays/cpu"])
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["ris-settings"]
    assert env["RIS_S3_ACCESS_KEY"]["secret"] == ("ris-s3", "RIS_S3_ACCESS_KEY")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    # Kubernetes expands $(VAR) in args from the container's env; an undefined one stays literal.
    defined = {e["name"] for e in container.get("env", [])}
    for arg in args:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(arg)):
            assert var in defined, f"{job_dir}: $({var}) in the args is not in the container's env"
    source = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)]["value"], args[3])
    volumes = spec["template"]["spec"]["volumes"]
    if job_dir == "jobs/ingest-minio":
        # python -m ingest streams the objects itself: no copy into the pod first.
        assert source.startswith("s3://"), source
        assert "initContainers" not in spec["template"]["spec"]
        assert [v["name"] for v in volumes] == ["tmp"] and "emptyDir" in volumes[0] and mounts == {"/tmp"}
        assert {"RIS_S3_ENDPOINT", "RIS_S3_SECURE", "RIS_S3_REGION", "RIS_S3_SECRET_KEY"} <= set(env)
        # The source bucket is one the setup Job lets the app user (ris-s3) read.
        bucket = source.removeprefix("s3://").split("/")[0]
        setup = _one(rendered["overlays/cpu"], "Job", "ris-minio-setup")["spec"]["template"]["spec"]["containers"][0]
        assert bucket == _env(setup, rendered["overlays/cpu"])["INCOMING_BUCKET"]["value"]
        assert env["RIS_S3_ACCESS_KEY"]["secret"][0] == _env(setup, rendered["overlays/cpu"])["APP_ACCESS_KEY"]["secret"][0]
    else:
        assert source in mounts
        claims = [v for v in volumes if "persistentVolumeClaim" in v]
        assert claims and all(v["persistentVolumeClaim"]["readOnly"] for v in claims)


# --- API keys and the public edge --------------------------------------------------------------------


def _secret_data(rendered: dict[str, list[dict[str, Any]]], name: str) -> dict[str, str]:
    """The decoded data of a Secret rendered by k8s/secrets (from the committed examples)."""
    import base64

    found = _find(rendered["secrets"], "Secret", name)
    assert found, f"Secret {name} is not generated by k8s/secrets"
    return {k: base64.b64decode(v).decode() for k, v in found[0].get("data", {}).items()}


def _mounted_secret_file(template: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) behind the file `path` in the container, or fail: it must be a mounted Secret."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if "subPath" in mount:
            if path != root:
                continue
            relative = mount["subPath"]
        elif path.startswith(root + "/"):
            relative = path[len(root) + 1:]
        else:
            continue
        secret = volumes[mount["name"]].get("secret")
        assert secret is not None, f"{path} is on volume {mount['name']}, which is not a Secret"
        assert mount.get("readOnly") is True, f"the keys volume {mount['name']} must be mounted read-only"
        assert not secret.get("optional", False), "the keys Secret must not be optional: no keys, no pod"
        if "items" in secret:
            keys = [item["key"] for item in secret["items"] if item["path"] == relative]
            assert keys, f"{path}: the Secret volume projects no item to {relative}"
            return secret["secretName"], keys[0]
        return secret["secretName"], relative
    raise AssertionError(f"{path} is not under any volume mounted in the container")


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_api_always_gets_its_keys_from_a_mounted_secret(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    from bento.http.auth import KeyTable

    docs = rendered[overlay]
    deployment = _one(docs, "Deployment", "ris-api")
    template = deployment["spec"]["template"]
    api = next(c for c in template["spec"]["containers"] if c["name"] == "api")
    env = _env(api, docs)
    assert "RIS_AUTH_KEYS_FILE" in env or "RIS_AUTH_KEYS" in env, f"{overlay}: the API is deployed without keys"
    entries = ""
    if "RIS_AUTH_KEYS_FILE" in env:
        path = env["RIS_AUTH_KEYS_FILE"]["value"]
        secret, key = _mounted_secret_file(template, api, path)
        data = _secret_data(rendered, secret)
        assert key in data, f"{overlay}: Secret {secret} has no key {key} (the file {path})"
        entries += data[key]
    if "RIS_AUTH_KEYS" in env:
        assert "secret" in env["RIS_AUTH_KEYS"] and not env["RIS_AUTH_KEYS"]["optional"], "RIS_AUTH_KEYS from a Secret"
        secret, key = env["RIS_AUTH_KEYS"]["secret"]
        entries += "\n" + _secret_data(rendered, secret)[key]
    # The committed example is in the format the service reads, and holds an admin entry (the ingest Jobs).
    (tmp_path / "keys").write_text(entries)
    table = KeyTable.from_settings("", tmp_path / "keys", env.get("RIS_AUTH_ANONYMOUS_SCOPES", {}).get("value", "search"))
    assert table.configured
    assert any("admin" in k.scopes for k in table.keys)
    assert not table.open_scopes(loopback=False) & {"write", "admin"}, "requests without a key may only search"
    # The keys are read from a file: the root filesystem stays read-only.
    assert api["securityContext"]["readOnlyRootFilesystem"] is True


def test_ingest_jobs_that_call_the_api_send_an_admin_key(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for name in RENDERED:
        for workload, template in _pod_templates(rendered[name]):
            for container in template["spec"]["containers"]:
                if not any(str(a).startswith("--service-url") for a in container.get("args", [])):
                    continue
                checked += 1
                where = f"{name} {workload['metadata']['name']}"
                assert not any(str(a).startswith("--api-key") for a in container["args"]), f"{where}: a key in the args"
                how = _env(container, _context(rendered, name)).get("RIS_AUTH_CLIENT_KEY")
                assert how is not None and "secret" in how, f"{where}: --service-url without RIS_AUTH_CLIENT_KEY from a Secret"
                assert not how["optional"], f"{where}: the client key must not be optional"
                secret, key = how["secret"]
                assert key in _secret_data(rendered, secret), f"{where}: Secret {secret} has no key {key}"
    assert checked, "no ingest Job uses --service-url any more: remove the ris-ingest-key Secret"


# What the public Ingress routes: (path, pathType). Everything else is for the cluster and operators.
PUBLIC_PATHS = {
    ("/", "Exact"),  # the page
    ("/static/", "Prefix"),  # its script and CSS
    ("/api/search", "Prefix"),  # /api/search, /api/search/url, /api/search/id
    ("/api/images", "Prefix"),  # GET originals, thumbnails, metadata (POST/DELETE need the write scope)
    ("/api/status", "Exact"),
    ("/api/model", "Exact"),
    ("/docs", "Exact"),
    ("/openapi.json", "Exact"),
}
# Never through the Ingress: admin routes, probes, metrics, BentoML's own schema routes.
PRIVATE_PATHS = ["/api/index", "/api/embed", "/metrics", "/ready", "/readyz", "/livez", "/healthz", "/schema.json", "/docs.json"]
# Write routes the public paths do reach (they check the write scope); a new one must be added here knowingly.
PUBLIC_WRITE_ROUTES = {("POST", "/api/images"), ("DELETE", "/api/images/{image_id}")}


def _routes(path: str, path_type: str, request: str) -> bool:
    """Whether an Ingress path of this type takes the request path (Kubernetes' documented semantics)."""
    if path_type == "Exact":
        return request == path
    if path_type == "Prefix":  # element-wise; a trailing slash of the rule is ignored
        base = path.rstrip("/")
        return base == "" or request == base or request.startswith(base + "/")
    raise AssertionError(f"pathType {path_type} for {path}: only Exact and Prefix have portable semantics")


def test_path_matching_follows_kubernetes_semantics() -> None:
    assert _routes("/api/images", "Prefix", "/api/images/abc/thumbnail")
    assert _routes("/api/images", "Prefix", "/api/images")
    assert not _routes("/api/images", "Prefix", "/api/imagesx")
    assert _routes("/static/", "Prefix", "/static") and _routes("/static/", "Prefix", "/static/app.js")
    assert not _routes("/", "Exact", "/api/index") and _routes("/", "Prefix", "/api/index")
    assert not _routes("/docs", "Exact", "/docs.json") and not _routes("/docs", "Exact", "/docs/")


def _ingress_paths(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for ingress in _find(docs, "Ingress"):
        spec = ingress["spec"]
        assert "defaultBackend" not in spec, "a defaultBackend routes every path"
        annotations = ingress["metadata"].get("annotations", {})
        for key in annotations:
            assert not re.search(r"use-regex|rewrite-target|snippet|app-root", key), f"{key} changes what paths reach the API"
        for rule in spec["rules"]:
            assert "http" in rule, "a rule without paths"
            found += [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
    return found


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_public_ingress_exposes_only_search_and_read_paths(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    assert _find(docs, "Ingress"), f"{overlay}: no Ingress"
    for ingress in _find(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            paths = [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
            assert len(paths) == len(set(paths)) and set(paths) == PUBLIC_PATHS, f"{overlay} {rule.get('host')}: {paths}"
    paths = _ingress_paths(docs)
    for private in PRIVATE_PATHS:
        for request in (private, private + "/", private + "/x", private + "/x/y"):
            reached = [p for p in paths if _routes(*p, request)]
            assert not reached, f"{overlay}: {request} is reachable through the Ingress ({reached})"


ROUTE_DECORATORS = {"get", "post", "put", "patch", "delete", "head", "options", "api_route"}


def _service_routes() -> tuple[list[tuple[str, str, set[str]]], set[str]]:
    """service.py's FastAPI routes as (METHOD, path, scopes its handler requires), and its other paths
    (mounts, the docs and the OpenAPI schema), read from the source: service.py's route decorators and the
    routes bento/http/edge.py adds to its app last (/metrics, the catch-all)."""
    trees = [ast.parse((ROOT / name).read_text()) for name in ("service.py", "bento/http/edge.py")]
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
            other |= {ast.literal_eval(k.value) for k in node.keywords if k.arg in ("docs_url", "openapi_url")}
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


def test_public_paths_match_the_services_routes_and_scopes() -> None:
    routes, other = _service_routes()
    assert {("POST", "/api/index"), ("POST", "/api/embed")} <= {(m, p) for m, p, _ in routes}
    paths = sorted(PUBLIC_PATHS)

    def sample(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "some-id", path)

    reachable = [(m, p, s) for m, p, s in routes if ":path}" not in p and any(_routes(*e, sample(p)) for e in paths)]
    for method, path, scopes in reachable:
        assert "admin" not in scopes, f"{method} {path} needs the admin scope and is reachable through the Ingress"
        assert scopes or path == "/", f"{method} {path} checks no scope and is public"
    writes = {(m, p) for m, p, s in reachable if "write" in s}
    assert writes == PUBLIC_WRITE_ROUTES, f"write routes behind the public Ingress changed: {writes}"
    # Every public path leads somewhere (no stale entries).
    for path, path_type in paths:
        targets = [sample(p) for _, p, _ in routes if ":path}" not in p] + sorted(other)
        assert any(_routes(path, path_type, t) for t in targets), f"{path} ({path_type}) reaches no route of service.py"


# --- operations: namespace, images, autoscaling, volumes, rollouts, monitoring ------------------------

# Kinds that have no namespace. Every other kind the renderings contain must be listed in NAMESPACED,
# so a new kind is classified knowingly (CRD kinds included: ServiceMonitor, ScaledObject).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "PriorityClass",
    "IngressClass", "CustomResourceDefinition", "ClusterIssuer", "ClusterTriggerAuthentication",
}
NAMESPACED = {
    "ServiceAccount", "Service", "Deployment", "StatefulSet", "Job", "ConfigMap", "Secret", "PersistentVolumeClaim",
    "PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress", "NetworkPolicy", "Role", "RoleBinding",
    "ServiceMonitor", "PodMonitor", "ScaledObject", "TriggerAuthentication",
}


def test_every_namespaced_object_is_in_the_products_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """An object without a namespace lands in whatever namespace `kubectl apply` uses (often `default`):
    a ServiceMonitor or ScaledObject there selects nothing in `ris`."""
    for name in [*RENDERED, "secrets"]:
        for doc in rendered[name]:
            kind, where = doc["kind"], f"{name} {doc['kind']}/{doc['metadata']['name']}"
            assert kind in NAMESPACED | CLUSTER_SCOPED, f"{where}: classify {kind} as namespaced or cluster-scoped"
            if kind in NAMESPACED:
                assert doc["metadata"].get("namespace") == NAMESPACE, f"{where} is not in namespace {NAMESPACE}"
            else:
                assert "namespace" not in doc["metadata"], where


def test_the_namespace_is_applied_apart_from_every_overlay_and_job(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """`kubectl delete -k overlays/x` must never delete the namespace (and with it every PVC: all data)."""
    for name in [n for n in RENDERED if n != "namespace"] + ["secrets"]:
        assert not _find(rendered[name], "Namespace"), f"{name} renders a Namespace: deleting it would delete all data"
    (namespace,) = rendered["namespace"]
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_milvus_can_execute_its_root_group_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """milvusdb/milvus ships bin/, lib/, configs/ as root:root 774: a non-root uid needs group 0."""
    checked = 0
    for name in RENDERED:
        for workload, template in _pod_templates(rendered[name]):
            if any(c["image"].split(":")[0].endswith("milvusdb/milvus") for c in _containers(template)):
                checked += 1
                context = template["spec"]["securityContext"]
                assert context["runAsUser"] != 0 and context["runAsNonRoot"] is True
                groups = [context.get("runAsGroup"), *context.get("supplementalGroups", [])]
                assert 0 in groups, f"{name} {workload['metadata']['name']}: Milvus cannot exec its root:root 774 files"
    assert checked, "no Milvus pod rendered"


def _autoscaled(docs: list[dict[str, Any]]) -> set[str]:
    refs = [h["spec"]["scaleTargetRef"] for h in _find(docs, "HorizontalPodAutoscaler") + _find(docs, "ScaledObject")]
    return {r["name"] for r in refs if r.get("kind", "Deployment") == "Deployment"}


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """spec.replicas on an autoscaled Deployment is reset by every `kubectl apply` (and wakes a GPU pod
    that KEDA scaled to zero)."""
    for name in WORKLOADS:
        targets = _autoscaled(rendered[name])
        assert targets, f"{name}: nothing is autoscaled"
        for target in targets:
            deployment = _one(rendered[name], "Deployment", target)
            assert "replicas" not in deployment["spec"], f"{name}: Deployment {target} sets replicas and is autoscaled"


def test_pods_with_fsgroup_and_a_volume_claim_skip_the_recursive_chown(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Without OnRootMismatch the kubelet walks the whole volume on every start (minutes for large data)."""
    checked = 0
    for name in RENDERED:
        for workload, template in _pod_templates(rendered[name]):
            context = template["spec"]["securityContext"]
            claims = workload["spec"].get("volumeClaimTemplates", []) + [
                v for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v
            ]
            if "fsGroup" in context and claims:
                checked += 1
                assert context.get("fsGroupChangePolicy") == "OnRootMismatch", f"{name} {workload['metadata']['name']}"
    assert checked >= 3, "Milvus, etcd and MinIO (at least) have volumes"


_QUANTITY = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_UNITS = {
    None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def _bytes(quantity: str | int) -> float:
    """A Kubernetes quantity (5Gi, 500M, 1073741824) in bytes."""
    found = _QUANTITY.match(str(quantity))
    assert found, f"not a byte quantity: {quantity}"
    return float(found.group(1)) * _UNITS[found.group(2)]


def test_quantity_parsing() -> None:
    assert _bytes("5Gi") == 5 * 2**30 and _bytes("512Mi") == 2**29 and _bytes("1G") == 10**9 and _bytes(1024) == 1024


ETCD_WAL_BYTES = 5 * 64 * 2**20  # etcd keeps up to --max-wals=5 WAL files of 64 MiB next to the database


def test_etcd_quota_fits_its_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A quota larger than the disk lets the disk fill up first (etcd corrupts) instead of the quota alarm
    refusing writes (recoverable: compact + defrag)."""
    checked = 0
    for name in RENDERED:
        for etcd in _find(rendered[name], "StatefulSet", "ris-etcd"):
            checked += 1
            container = etcd["spec"]["template"]["spec"]["containers"][0]
            words = [*container.get("command", []), *container.get("args", [])]
            flags = [w.split("=", 1)[1] for w in words if w.startswith("--quota-backend-bytes=")]
            envs = [e["value"] for e in container.get("env", []) if e["name"] == "ETCD_QUOTA_BACKEND_BYTES"]
            assert len(flags + envs) == 1, f"{name}: set the etcd quota exactly once (flag or ETCD_QUOTA_BACKEND_BYTES)"
            quota = _bytes((flags + envs)[0])
            (claim,) = [c for c in etcd["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == "data"]
            volume = _bytes(claim["spec"]["resources"]["requests"]["storage"])
            assert quota <= 0.8 * volume, f"{name}: etcd quota {quota:.0f} B > 80% of its {volume:.0f} B volume"
            assert quota + ETCD_WAL_BYTES <= volume, f"{name}: etcd quota + WAL exceed the volume"
    assert checked >= 3, "etcd renders in cpu, gpu and keda"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not _matches(selector.get("matchLabels", {}), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
            "Exists": key in labels, "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_service_monitors_select_services_of_their_rendering(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A ServiceMonitor that selects no Service scrapes nothing, silently (its HPAs/KEDA then see no data)."""
    for name in RENDERED:
        docs = rendered[name]
        for monitor in _find(docs, "ServiceMonitor"):
            where = f"{name} ServiceMonitor/{monitor['metadata']['name']}"
            namespaces = monitor["spec"].get("namespaceSelector", {}).get("matchNames", [monitor["metadata"]["namespace"]])
            services = [
                s for s in _find(docs, "Service")
                if s["metadata"]["namespace"] in namespaces and _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
            ]
            assert services, f"{where} selects no Service in this rendering"
            for endpoint in monitor["spec"]["endpoints"]:
                scraped: list[str] = []
                for service in services:
                    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, f"{where}: {service['metadata']['name']}"
                    scraped += [
                        w["metadata"]["name"] for w, t in _pod_templates(docs)
                        if _matches(service["spec"]["selector"], t["metadata"]["labels"])
                    ]
                assert len(scraped) == len(set(scraped)), f"{where}: pods scraped twice (through two Services): {scraped}"


def test_service_monitors_carry_the_prometheus_release_label(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """kube-prometheus-stack's Prometheus selects ServiceMonitors by `release: <Helm release>`."""
    values = yaml.safe_load((K8S / "milvus-cluster" / "values.yaml").read_text())
    release = values["metrics"]["serviceMonitor"]["additionalLabels"]["release"]
    assert values["metrics"]["serviceMonitor"]["enabled"] is True
    monitors = [m for name in RENDERED for m in _find(rendered[name], "ServiceMonitor")]
    assert monitors
    for monitor in monitors:
        assert monitor["metadata"]["labels"].get("release") == release, monitor["metadata"]["name"]


def test_statefulsets_are_governed_by_headless_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """spec.serviceName must name a headless Service (stable pod DNS); clients keep a ClusterIP Service."""
    checked = 0
    for name in RENDERED:
        docs = rendered[name]
        for statefulset in _find(docs, "StatefulSet"):
            checked += 1
            where = f"{name} StatefulSet/{statefulset['metadata']['name']}"
            labels = statefulset["spec"]["template"]["metadata"]["labels"]
            governing = _find(docs, "Service", statefulset["spec"]["serviceName"])
            assert governing, f"{where}: serviceName {statefulset['spec']['serviceName']} is not rendered"
            assert governing[0]["spec"].get("clusterIP") == "None", f"{where}: its serviceName is not headless"
            assert _matches(governing[0]["spec"]["selector"], labels), f"{where}: the headless Service selects other pods"
            clients = [
                s for s in _find(docs, "Service")
                if s["spec"].get("clusterIP") != "None" and _matches(s["spec"]["selector"], labels)
            ]
            assert clients, f"{where}: no ClusterIP Service for clients"
    assert checked


# Labels the Prometheus Operator puts on every target of a ServiceMonitor, and BentoML 1.4's labels
# on bentoml_service_* (RunnerTrafficMetricsMiddleware, namespace bentoml_service).
OPERATOR_TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}
BENTOML_LABELS = {"endpoint", "service_name", "service_version", "runner_name", "http_response_code"}
# The product's metrics (bento/core/metrics.py) as exposed, a histogram by its series.
PRODUCT_LABELS = {
    **{name: set(labels) for name, labels in LABELS.items() if name != "ris_http_request_duration_seconds"},
    **{f"ris_http_request_duration_seconds_{suffix}": set(LABELS["ris_http_request_duration_seconds"]) for suffix in ("count", "sum")},
    "ris_http_request_duration_seconds_bucket": {*LABELS["ris_http_request_duration_seconds"], "le"},
}


def _bento_honor_labels(rendered: dict[str, list[dict[str, Any]]]) -> bool:
    """honorLabels of the ServiceMonitor endpoints that scrape the bento (one value everywhere)."""
    found: set[bool] = set()
    for name in ("overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster"):
        docs = rendered[name]
        bento = [s for s in _find(docs, "Service") if s["metadata"]["name"] in ("ris-api", "ris-embedder")]
        for monitor in _find(docs, "ServiceMonitor"):
            if any(_selects(monitor["spec"]["selector"], s["metadata"]["labels"]) for s in bento):
                found |= {bool(e.get("honorLabels", False)) for e in monitor["spec"]["endpoints"]}
    assert len(found) == 1, f"the bento's ServiceMonitor endpoints disagree on honorLabels: {found}"
    return found.pop()


def _stored_labels(honor_labels: bool, own: set[str] = BENTOML_LABELS) -> set[str]:
    """The label names a series with the labels ``own`` has in Prometheus after the scrape."""
    if honor_labels:
        return OPERATOR_TARGET_LABELS | own
    clashes = own & OPERATOR_TARGET_LABELS
    return OPERATOR_TARGET_LABELS | (own - clashes) | {f"exported_{c}" for c in clashes}


def _path_label(honor_labels: bool) -> str:
    """The name of BentoML's request-path label in Prometheus."""
    return "endpoint" if honor_labels else "exported_endpoint"


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*|<<\.Series>>)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def _promql_selectors(query: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, operator, value)...]) of every {...} selector of the query (template
    placeholders such as prometheus-adapter's <<.LabelMatchers>> are skipped; the metric is "" where the
    selector names none, <<.Series>> where prometheus-adapter fills it in)."""
    found = []
    for metric, selector in _SELECTOR.findall(query):
        matchers = []
        for part in selector.split(","):
            if not part.strip() or part.strip().startswith("<<"):
                continue
            matcher = _MATCHER.fullmatch(part)
            assert matcher, f"cannot parse the matcher {part!r} in {query!r}"
            matchers.append(matcher.groups())
        found.append((metric, matchers))
    return found


def _promql_matchers(query: str) -> list[tuple[str, str, str]]:
    return [m for _, matchers in _promql_selectors(query) for m in matchers]


def test_promql_matcher_parsing() -> None:
    assert _promql_matchers('sum(x{<<.LabelMatchers>>, a=~"b|c", d!="e"}) by (<<.GroupBy>>)') == [("a", "=~", "b|c"), ("d", "!=", "e")]
    assert _promql_selectors('sum(rate(m_total{a="/x"}[2m])) + sum(<<.Series>>{<<.LabelMatchers>>})') == [
        ("m_total", [("a", "=", "/x")]), ("<<.Series>>", []),
    ]


def _embedder_routes() -> set[str]:
    """The routes of service.py's Embedder APIs (BentoML's default route: /<method name>)."""
    tree = ast.parse((ROOT / "service.py").read_text())
    (embedder,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Embedder"]
    return {
        f"/{node.name}" for node in embedder.body if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d.func if isinstance(d, ast.Call) else d) == "bentoml.api" for d in node.decorator_list)
    }


def _queries(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[str, list[tuple[str, str, str]]]]]:
    """Every autoscaling query (the ScaledObject's triggers, the adapter's rules) as its selectors, by
    where it is; prometheus-adapter's <<.Series>> is the rule's seriesQuery metric."""
    scaled = _one(rendered["overlays/keda"], "ScaledObject", "ris-embedder")
    queries = {f"trigger {t['name']}": _promql_selectors(t["metadata"]["query"]) for t in scaled["spec"]["triggers"]}
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    for index, rule in enumerate(adapter["rules"]["custom"]):
        ((series, _),) = _promql_selectors(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], series), f"the rule renames {rule['name']['matches']}, not {series}"
        selectors = _promql_selectors(rule["seriesQuery"]) + _promql_selectors(rule["metricsQuery"])
        queries[f"adapter rule {index}"] = [(series if metric == "<<.Series>>" else metric, m) for metric, m in selectors]
    return queries


def test_promql_selectors_use_the_label_names_prometheus_stores(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every autoscaling query reads the product's own metrics (route templates, a bounded label set),
    with label names as Prometheus stores them: the product's do not clash with the operator's target
    labels. Filtering paths on BentoML's `endpoint` would compare the port name ("http") with paths:
    nothing matches (KEDA never wakes the embedder) or nothing is excluded."""
    honor = _bento_honor_labels(rendered)
    api_templates = {re.sub(r"\{([^}:]+)(:[^}]*)?\}", r"{\1}", p) for _, p, _ in _service_routes()[0]}
    api_templates |= {f"{m}/{{path}}" for m in _service_routes()[1] if not m.endswith(".json") and m != "/docs"}
    embedder_templates = _embedder_routes()
    embedding_routes = {route for route in embedder_templates if route.startswith("/embed")}
    assert embedding_routes == {"/embed", "/embed_small", "/embed_copy", "/embed_npy"}, embedder_templates
    known_routes = {
        "ris_embedder_requests_total": api_templates | {INTERNAL, UNMATCHED},
        "ris_http_requests_in_progress": api_templates | embedder_templates | {UNMATCHED},
    }
    queries = _queries(rendered)
    for where, selectors in queries.items():
        for metric, matchers in selectors:
            assert metric in PRODUCT_LABELS, f"{where}: {metric or 'a selector without a metric'} is not one of the product's metrics"
            own = PRODUCT_LABELS[metric]
            assert not own & OPERATOR_TARGET_LABELS, f"{metric}'s labels {sorted(own & OPERATOR_TARGET_LABELS)} would be renamed"
            stored = _stored_labels(honor, own)
            for label, operator, value in matchers:
                assert label in stored, f"{where}: {label!r} does not exist after the scrape (labels: {sorted(stored)})"
                assert label != "endpoint" or set(value.split("|")) <= {"http"}, f"{where}: `endpoint` is the scrape port's name"
                if label == "route":
                    assert operator in ("=", "=~"), f"{where}: name the routes wanted"
                    assert set(value.split("|")) <= known_routes[metric], f"{where}: no such route: {value}"
    # What each query is for.
    metrics = {where: {m for m, _ in selectors} for where, selectors in queries.items()}
    assert metrics["trigger api-embedder-requests"] == {"ris_embedder_requests_total"}, "the wake-up counts requests to the embedder"
    assert metrics["trigger embedder-in-flight"] == {"ris_http_requests_in_progress"}
    in_flight = dict(_promql_selectors(next(
        t["metadata"]["query"] for t in _one(rendered["overlays/keda"], "ScaledObject", "ris-embedder")["spec"]["triggers"]
        if t["name"] == "embedder-in-flight"
    )))["ris_http_requests_in_progress"]
    assert {v for label, _, value in in_flight if label == "route" for v in value.split("|")} == embedding_routes
    assert all(metrics[w] == {"ris_http_requests_in_progress"} for w in metrics if w.startswith("adapter"))


def _traffic_timeouts() -> dict[str, float]:
    """class name -> traffic timeout (s) of each @bentoml.service in service.py (BentoML's default: 60)."""
    tree = ast.parse((ROOT / "service.py").read_text())
    timeouts: dict[str, float] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "bentoml.service":
                    traffic = next((k.value for k in deco.keywords if k.arg == "traffic"), None)
                    timeouts[node.name] = float(ast.literal_eval(traffic).get("timeout", 60)) if traffic else 60.0
    return timeouts


def test_bento_pods_drain_before_they_stop(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A preStop delay keeps a terminating pod serving while its removal from the Service propagates; the
    grace period covers that delay plus the longest request the service lets run."""
    timeouts = _traffic_timeouts()
    entry = {"ris-api": "ImageSearch", "ris-embedder": "Embedder"}  # the service each Deployment's port serves
    for name in WORKLOADS:
        for workload, container in _bento_containers(rendered[name]):
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, f"{name} {workload}: {command}"
            delay = float(command[1])
            assert 5 <= delay <= 30, f"{name} {workload}: preStop sleep {delay}"
            grace = _one(rendered[name], "Deployment", workload)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > delay + timeouts[entry[workload]], f"{name} {workload}: grace {grace} s"


def test_ingest_pods_reach_minio_milvus_and_the_api(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Both ingest Jobs read and write MinIO, write Milvus and embed through the API: the NetworkPolicies
    (default deny) must admit them."""
    for overlay in ("overlays/cpu", "overlays/gpu", "overlays/keda"):
        docs = rendered[overlay]
        policies = _find(docs, "NetworkPolicy")
        targets = {_component(t): t for _, t in _pod_templates(docs)}
        for job in INGEST:
            (template,) = [t for _, t in _pod_templates(rendered[job])]
            for component, port in (("minio", "s3"), ("milvus", "grpc"), ("api", "http")):
                sources = _allowed_sources(policies, targets[component], port)
                admitted = any(
                    not source or ("podSelector" in source and "namespaceSelector" not in source
                                   and _matches(source["podSelector"].get("matchLabels", {}), template["metadata"]["labels"]))
                    for source in sources
                )
                assert admitted, f"{overlay}: {job} pods cannot reach {component}:{port}"


# --- the MinIO setup script: the mc image has a shell and mc, nothing else ------------------------------

# Built into every POSIX sh (dash, bash, busybox ash): the special built-ins and the usual regular ones.
SH_BUILTINS = {
    ":", ".", "break", "continue", "eval", "exec", "exit", "export", "readonly", "return", "set", "shift", "times",
    "trap", "unset", "echo", "printf", "test", "[", "read", "cd", "pwd", "true", "false", "command", "wait",
    "umask", "getopts", "kill", "type", "hash", "alias", "unalias", "jobs", "fg", "bg",
}
SH_RESERVED_OPENERS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{"}
SH_RESERVED_CLOSERS = {"fi", "done", "}"}
_OPERATORS = ["&&", "||", ";;", ">>", ">&", "<&", "<<", ";", "&", "|", "(", ")", "<", ">"]
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _sh_tokens(script: str, commands: list[str]) -> list[tuple[str, str]]:
    """Words and operators of a shell script, quotes respected; the command words of $(...) substitutions
    go to `commands` directly. Refuses what it does not model (heredocs, backticks, $(( )), $() inside
    double quotes) rather than guess."""
    tokens: list[tuple[str, str]] = []
    word, in_word, i, n = "", False, 0, len(script)

    def end_word() -> None:
        nonlocal word, in_word
        if in_word:
            tokens.append(("word", word))
        word, in_word = "", False

    while i < n:
        c = script[i]
        if c == "\\" and i + 1 < n:
            if script[i + 1] != "\n":
                word, in_word = word + script[i + 1], True
            i += 2
        elif c == "'":
            j = script.index("'", i + 1)
            word, in_word, i = word + script[i + 1:j], True, j + 1
        elif c == '"':
            j = i + 1
            while script[j] != '"':
                assert script[j] != "`" and script[j:j + 2] != "$(", "keep command substitutions out of double quotes"
                j += 2 if script[j] == "\\" else 1
            word, in_word, i = word + script[i + 1:j], True, j + 1
        elif c == "`":
            raise AssertionError("backticks: use $(...)")
        elif script.startswith("$((", i):
            raise AssertionError("arithmetic expansion is not modelled")
        elif script.startswith("$(", i):
            depth, j = 1, i + 2
            while depth:
                if script[j] in "'\"":
                    j = script.index(script[j], j + 1)
                depth += {"(": 1, ")": -1}.get(script[j], 0)
                j += 1
            commands.extend(_sh_command_words(script[i + 2:j - 1]))
            word, in_word, i = word + "X", True, j
        elif script.startswith("${", i):
            j = script.index("}", i)
            word, in_word, i = word + script[i:j + 1], True, j + 1
        elif c == "#" and not in_word:
            i = script.find("\n", i) if "\n" in script[i:] else n
        elif c == "\n":
            end_word()
            tokens.append(("op", "\n"))
            i += 1
        elif c in " \t":
            end_word()
            i += 1
        else:
            op = next((o for o in _OPERATORS if script.startswith(o, i)), None)
            if op is None:
                word, in_word, i = word + c, True, i + 1
                continue
            assert op != "<<", "heredocs are not modelled"
            if op[0] in "<>" and in_word and word.isdigit():
                word, in_word = "", False  # an IO number (2>...)
            end_word()
            tokens.append(("op", op))
            i += len(op)
    end_word()
    return tokens


def _sh_command_words(script: str) -> list[str]:
    """Every word a POSIX shell would run as a command in the script (builtins and programs alike)."""
    commands: list[str] = []
    tokens = _sh_tokens(script, commands)
    expect_command, skip_next, mode = True, False, []  # mode: a stack of "case-subject", "patterns", "body", "for"
    for kind, text in tokens:
        if skip_next:  # the target of a redirection
            skip_next = False
            continue
        if kind == "op" and text in ("<", ">", ">>", ">&", "<&"):
            skip_next = True
            continue
        state = mode[-1] if mode else None
        if state == "case-subject":
            if kind == "word" and text == "in":
                mode[-1] = "patterns"
            continue
        if state == "patterns":
            if kind == "word" and text == "esac":
                mode.pop()
                expect_command = False
            elif kind == "op" and text == ")":
                mode[-1] = "body"
                expect_command = True
            continue
        if state == "for":
            if kind == "op" and text in (";", "\n"):
                mode.pop()
                expect_command = True
            continue
        if kind == "op":
            if text == ";;" and state == "body":
                mode[-1] = "patterns"
            expect_command = True
            continue
        if not expect_command:
            continue
        if text == "esac" and state == "body":
            mode.pop()
            expect_command = False
        elif text == "case":
            mode.append("case-subject")
        elif text == "for":
            mode.append("for")
        elif text in SH_RESERVED_OPENERS:
            expect_command = True
        elif text in SH_RESERVED_CLOSERS:
            expect_command = False
        elif _ASSIGNMENT.match(text):
            expect_command = True
        else:
            commands.append(text)
            expect_command = False
    assert not mode, f"unbalanced case/for in the script: {mode}"
    return commands


def test_sh_command_words_finds_every_command() -> None:
    """The tokenizer sees commands wherever sh runs them (so the allow-list test below means something)."""
    found = _sh_command_words(
        "set -e  # comment: grep\n"
        "until mc ready x >/dev/null 2>&1; do sleep 5; done\n"
        "v=$(cat /f | tr a b) && echo \"$v grep\" || awk 1\n"
        "for b in a \"c d\" wc; do mc mb \"x/$b\"; done\n"
        "case \"$v\" in\n  *grep*|sed) cut -c1 ;;\n  *) printf '%s' 'sort'; exit 1 ;;\nesac\n"
        "if test -n \"$v\"; then { head -1; }; fi\n"
        "x=1 y=2 env\n"
    )
    # (the words of $(...) come first: the tokenizer collects them as it meets them)
    assert sorted(found) == sorted(["set", "mc", "sleep", "cat", "tr", "echo", "awk", "mc", "cut", "printf", "exit", "test", "head", "env"])
    for unsupported in ("cat <<EOF\nx\nEOF\n", "echo `id`", "echo \"$(id)\""):
        with pytest.raises(AssertionError):
            _sh_command_words(unsupported)


def _mc_scripts(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    scripts = []
    for name in RENDERED:
        for workload, template in _pod_templates(rendered[name]):
            for container in _containers(template):
                if container["image"].split(":")[0] == "minio/mc":
                    assert container["command"][0] in ("/bin/sh", "sh") and len(container["args"]) == 1
                    scripts.append((f"{name} {workload['metadata']['name']}", container["args"][0]))
    return scripts


def test_mc_scripts_use_only_shell_builtins_and_mc(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The minio/mc image is ubi-micro based: no grep, sed, awk, cat, sleep... only the shell and mc."""
    scripts = _mc_scripts(rendered)
    assert scripts, "no mc container rendered (the MinIO setup Job)"
    for where, script in scripts:
        words = _sh_command_words(script)
        assert "mc" in words
        outside = sorted(set(words) - SH_BUILTINS - {"mc"})
        assert not outside, f"{where}: not in the mc image: {outside}"


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="no /bin/sh")
def test_minio_setup_script_runs_with_nothing_but_mc_on_the_path(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Run the setup script under /bin/sh with PATH holding only a stand-in `mc`: any other program would
    be `not found`. The policies it writes must be valid JSON naming the buckets."""
    job = _one(rendered["overlays/cpu"], "Job", "ris-minio-setup")["spec"]["template"]["spec"]["containers"][0]
    script = job["args"][0].replace("/tmp/", f"{tmp_path}/")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mc").write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$MC_LOG"\n'
        'case "$1 $2 $3" in "admin user info") echo "AccessKey: $5"; echo "PolicyName: ris-app,ris-milvus" ;; esac\n'
    )
    (fake / "mc").chmod(0o755)
    env = {k: v["value"] for k, v in _env(job, rendered["overlays/cpu"]).items() if "value" in v}
    env |= {"PATH": str(fake), "MC_LOG": str(tmp_path / "calls"), "MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "pw",
            "APP_ACCESS_KEY": "app", "APP_SECRET_KEY": "s1", "MILVUS_ACCESS_KEY": "milvus", "MILVUS_SECRET_KEY": "s2"}
    done = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "buckets and users ready" in done.stdout
    app = json.loads((tmp_path / "app.json").read_text())
    assert {r for s in app["Statement"] for r in s["Resource"]} == {
        f"arn:aws:s3:::{env['IMAGES_BUCKET']}", f"arn:aws:s3:::{env['IMAGES_BUCKET']}/*",
        f"arn:aws:s3:::{env['INCOMING_BUCKET']}", f"arn:aws:s3:::{env['INCOMING_BUCKET']}/*",
    }
    milvus = json.loads((tmp_path / "milvus.json").read_text())
    assert {r for s in milvus["Statement"] for r in s["Resource"]} == {f"arn:aws:s3:::{env['MILVUS_BUCKET']}", f"arn:aws:s3:::{env['MILVUS_BUCKET']}/*"}
    calls = (tmp_path / "calls").read_text()
    assert "mb --ignore-existing ris/images" in calls and "admin policy attach ris ris-app --user app" in calls


def test_image_ids_in_request_paths_are_rewritten_before_prometheus_stores_them(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """BentoML labels each request with its raw path: without a rewrite every image read through the API
    (/api/images/<sha256>, .../thumbnail, .../metadata) is a series of its own. The relabeling must fold
    exactly those into route templates and leave every other route as it is (Prometheus anchors the regex
    and writes $1 for the first group)."""
    path_label = _path_label(_bento_honor_labels(rendered))
    monitor = _one(rendered["overlays/gpu"], "ServiceMonitor", "ris-bento")
    image_id = "ab" * 32

    def stored(path: str) -> str:
        for endpoint in monitor["spec"]["endpoints"]:
            value = path
            for rule in endpoint.get("metricRelabelings", []):
                if rule.get("action", "replace") != "replace" or rule["sourceLabels"] != [path_label]:
                    continue
                assert rule["targetLabel"] == path_label
                match = re.fullmatch(rule["regex"], value)
                if match:
                    groups = match.groups()
                    value = re.sub(r"\$(\d)", lambda m, groups=groups: groups[int(m.group(1)) - 1] or "", rule["replacement"])
            return value
        raise AssertionError("the ServiceMonitor has no endpoints")

    assert stored(f"/api/images/{image_id}") == "/api/images/{id}"
    assert stored(f"/api/images/{image_id}/thumbnail") == "/api/images/{id}/thumbnail"
    assert stored(f"/api/images/{image_id}/metadata") == "/api/images/{id}/metadata"
    for malformed in ("/api/images/NOT-AN-ID", f"/api/images/{image_id}/", "/api/images/x/metadata"):
        assert stored(malformed).startswith("/api/images/{id}"), malformed
    for route in ("/api/images", "/api/search", "/api/search/id", "/api/labels", "/api/status", "/"):
        assert stored(route) == route
