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

from bento.config import setting_fields, settings_from

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
BENTO_IMAGE = "reverse-image-search"

# Every kustomization a user applies (k8s/secrets is rendered from its examples, see below).
RENDERED = [
    "overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster", "jobs/ingest", "jobs/ingest-minio",
]
WORKLOADS = ["overlays/cpu", "overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster"]
INGEST = ["jobs/ingest", "jobs/ingest-minio"]
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
    assert found - {"base", "secrets"} == set(RENDERED), "a new kustomization must be added to RENDERED"


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
        docs = rendered[name]
        monitors = _find(docs, "ServiceMonitor")
        assert monitors
        for monitor in monitors:
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
            selector = monitor["spec"]["selector"].get("matchLabels", {})
            services = [s for s in _find(docs, "Service") if _matches(selector, s["metadata"]["labels"])]
            for expr in monitor["spec"]["selector"].get("matchExpressions", []):
                services = [s for s in services if s["metadata"]["labels"].get(expr["key"]) in expr["values"]]
            assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
            for endpoint in monitor["spec"]["endpoints"]:
                for service in services:
                    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

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


def _bento_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (w["metadata"]["name"], c)
        for w, t in _pod_templates(docs)
        for c in t["spec"]["containers"]
        if c["image"].split("/")[-1].split(":")[0] == BENTO_IMAGE
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
    assert not unknown, f"not settings of bento.config.Settings: {unknown}"


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
    for name in WORKLOADS:
        for workload, container in _bento_containers(rendered[name]):
            ports = {p["name"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] in routes, f"{name} {workload} {probe}: {get['path']}"
                assert get["port"] in ports
            # Realistic start-up allowance: model load, warm-up, CUDA init, a cold image cache.
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    for template in ("overlays/gpu", "overlays/keda"):
        for monitor in _find(rendered[template], "ServiceMonitor"):
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["path"] in routes or monitor["metadata"]["name"] == "ris-milvus"


def test_embedder_deployment_serves_the_embedder_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = _service_names()
    assert {"Embedder", "ImageSearch"} <= set(names)
    for name in WORKLOADS:
        embedder = next(c for w, c in _bento_containers(rendered[name]) if w == "ris-embedder")
        args = embedder["args"]
        assert args[0] == "start-http-server"
        assert args[args.index("--service-name") + 1] == names["Embedder"]
    # The in-flight metric rules name BentoML services by their runner_name label.
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
    for name in WORKLOADS:
        bento = {c["image"] for _, c in _bento_containers(rendered[name])}
        assert len(bento) == 1, f"{name}: the API and the embedder run different images {bento}"
        ingest = {c["image"] for _, c in _bento_containers(rendered["jobs/ingest"])}
        assert ingest == {f"{BENTO_IMAGE}:0.1.0"} and bento.pop().endswith(":0.1.0")
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
    assert args[3] in mounts
    if job_dir == "jobs/ingest-minio":
        (fetch,) = spec["template"]["spec"]["initContainers"]
        assert "mc mirror" in fetch["args"][0] and args[3] in {m["mountPath"] for m in fetch["volumeMounts"]}


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
    from bento.auth import KeyTable

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
PRIVATE_PATHS = ["/api/index", "/api/embed", "/metrics", "/readyz", "/livez", "/healthz", "/schema.json", "/docs.json"]
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
    (mounts, the docs and the OpenAPI schema), read from the source."""
    tree = ast.parse((ROOT / "service.py").read_text())
    routes: list[tuple[str, str, set[str]]] = []
    other: set[str] = set()
    scope_of = {"Searcher": "search", "Writer": "write", "Admin": "admin"}
    for node in ast.walk(tree):
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
