"""Kubernetes manifests (k8s/): every kustomization renders offline and passes Kubernetes' schemas strictly;
the CRD objects (no schema offline) have their required fields; the structure a cluster relies on: the
bento images named once and pinned, every object in the product's namespace (the namespace itself applied
apart), headless Services governing the StatefulSets, volumes (fsGroup, the etcd quota) and Milvus' uid.

The renderings are the session fixtures `rendered` and `rendered_dir` (tests/conftest.py, built with
tests/k8s_support.py).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s_support import (
    BENTO_CPU_IMAGE,
    BENTO_IMAGE,
    BENTO_IMAGES,
    INGEST,
    K8S,
    RENDERED,
    WORKLOADS,
    bento_containers,
    containers,
    find,
    image_name,
    matches,
    one,
    pod_templates,
    requires_kubectl,
    tool,
)
from tests.support import ROOT

pytestmark = requires_kubectl


NAMESPACE = "ris"
# The one kustomize Component naming the bento image (k8s/base and k8s/jobs/ingest include it).
IMAGE_COMPONENT = "components/bento-image"
# The oldest and the newest Kubernetes the manifests are validated against (Indexed Job with
# backoffLimitPerIndex and podFailurePolicy FailIndex need 1.29+; kubectl here renders as 1.32).
K8S_VERSIONS = ["1.30.0", "1.37.0"]


def test_every_kustomization_is_rendered() -> None:
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    components = {
        str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml") if yaml.safe_load(p.read_text())["kind"] == "Component"
    }
    # Each is tested through what includes it (the gpu overlays' image test covers cuda-embedder).
    assert components == {IMAGE_COMPONENT, "overlays/gpu/cuda-embedder"}, "a new Component must be tested through what includes it"
    assert found - {"base", "secrets"} - components == set(RENDERED), "a new kustomization must be added to RENDERED"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_pass_strict_schema_validation(rendered_dir: Path, version: str) -> None:
    files = sorted(str(p) for p in rendered_dir.glob("*.yaml"))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *files],
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
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[0], str(tmp_path / "bad.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0


def test_crd_objects_have_their_required_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    keda = rendered["overlays/keda"]
    scaled = one(keda, "ScaledObject", "ris-embedder")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    one(keda, target.get("kind", "Deployment"), target["name"])
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["triggers"], "a ScaledObject needs triggers"
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata values are strings"
    # KEDA owns the embedder's HPA: no second HPA may target it.
    assert not [h for h in find(keda, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == target["name"]]
    for name in ("overlays/gpu", "overlays/keda"):
        assert find(rendered[name], "ServiceMonitor"), f"{name}: no ServiceMonitor"
        for monitor in find(rendered[name], "ServiceMonitor"):
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"

    (milvus,) = rendered["milvus-cluster"]
    assert milvus["apiVersion"] == "milvus.io/v1beta1" and milvus["kind"] == "Milvus"
    assert milvus["spec"]["mode"] == "cluster"
    assert {"etcd", "storage"} <= set(milvus["spec"]["dependencies"])
    values = yaml.safe_load((K8S / "milvus-cluster" / "values.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    assert values["image"]["all"]["tag"] == milvus["spec"]["components"]["image"].split(":")[1]


def test_images_are_consistent_and_pinned(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # The Jobs are applied on their own next to whichever overlay runs: every rendering must name the
    # bento images alike, from a registry (a bare `reverse-image-search` is pulled from Docker Hub's
    # library namespace: ImagePullBackOff on a real cluster). Only a GPU embedder runs the CUDA image.
    images: dict[str, str] = {}
    for name in WORKLOADS + INGEST:
        found = bento_containers(rendered[name])
        assert found, f"{name}: no container runs a bento image"
        for workload, container in found:
            gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
            expected = BENTO_IMAGE if gpu else BENTO_CPU_IMAGE
            assert image_name(container["image"]) == expected, f"{name}/{workload} runs {container['image']}, not {expected}"
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
        for _, template in pod_templates(rendered[name]):
            for container in containers(template):
                image = container["image"]
                assert ":" in image.split("/")[-1] and not image.endswith(":latest"), image


def _fully_qualified(image: str) -> bool:
    """registry-host/path:tag, a release tag (not latest): what a cluster pulls without guessing a registry."""
    registry, _, rest = image.partition("/")
    tag = rest.rpartition(":")[2] if ":" in rest else ""
    return bool(rest) and ("." in registry or ":" in registry) and bool(tag) and tag != "latest"


def test_every_image_reference_is_fully_qualified_and_pinned(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Short names resolve to Docker Hub, where MinIO no longer publishes (September 2026): minio and mc
    come from quay.io; every other image names its registry too. The Milvus Operator's CR and the Helm
    values of the cluster mode are image references as well."""
    references: list[str] = []
    for name in RENDERED:
        for _, template in pod_templates(rendered[name]):
            references += [container["image"] for container in containers(template)]
    cluster = K8S / "milvus-cluster"
    operator = yaml.safe_load((cluster / "milvus-operator.yaml").read_text())
    references.append(operator["spec"]["components"]["image"])
    values = yaml.safe_load((cluster / "values.yaml").read_text())["image"]["all"]
    references.append(f"{values['repository']}:{values['tag']}")
    third_party = [image for image in references if image_name(image) not in BENTO_IMAGES]
    assert len(third_party) >= 5, third_party  # MinIO, mc, etcd, Milvus (standalone, operator, Helm)
    unqualified = sorted({image for image in references if not _fully_qualified(image)})
    assert not unqualified, f"not registry/path:release-tag: {unqualified}"
    minio = [image for image in references if "minio/" in image]
    assert minio and all(image.startswith("quay.io/minio/") for image in minio), minio


# Kinds that have no namespace. Every other kind the renderings contain must be listed in NAMESPACED,
# so a new kind is classified knowingly (CRD kinds included: ServiceMonitor, ScaledObject).
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "PriorityClass",
    "IngressClass", "CustomResourceDefinition", "ClusterIssuer", "ClusterTriggerAuthentication",
}
NAMESPACED = {
    "ServiceAccount", "Service", "Deployment", "StatefulSet", "Job", "CronJob", "ConfigMap", "Secret", "PersistentVolumeClaim",
    "PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress", "NetworkPolicy", "Role", "RoleBinding",
    "ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication",
}


def test_every_namespaced_object_is_in_the_products_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """An object without a namespace lands in whatever namespace `kubectl apply` uses (often `default`):
    a ServiceMonitor or ScaledObject there selects nothing in `ris`."""
    for name in [*RENDERED, "secrets"]:
        assert rendered[name], f"{name} renders nothing: nothing was checked"
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
        assert not find(rendered[name], "Namespace"), f"{name} renders a Namespace: deleting it would delete all data"
    (namespace,) = rendered["namespace"]
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_milvus_can_execute_its_root_group_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """milvusdb/milvus ships bin/, lib/, configs/ as root:root 774: a non-root uid needs group 0."""
    checked = 0
    for name in RENDERED:
        for workload, template in pod_templates(rendered[name]):
            if any(c["image"].split(":")[0].endswith("milvusdb/milvus") for c in containers(template)):
                checked += 1
                context = template["spec"]["securityContext"]
                assert context["runAsUser"] != 0 and context["runAsNonRoot"] is True
                groups = [context.get("runAsGroup"), *context.get("supplementalGroups", [])]
                assert 0 in groups, f"{name} {workload['metadata']['name']}: Milvus cannot exec its root:root 774 files"
    assert checked, "no Milvus pod rendered"


def test_pods_with_fsgroup_and_a_volume_claim_skip_the_recursive_chown(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Without OnRootMismatch the kubelet walks the whole volume on every start (minutes for large data)."""
    checked = 0
    for name in RENDERED:
        for workload, template in pod_templates(rendered[name]):
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
        for etcd in find(rendered[name], "StatefulSet", "ris-etcd"):
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


def test_statefulsets_are_governed_by_headless_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """spec.serviceName must name a headless Service (stable pod DNS); clients keep a ClusterIP Service."""
    checked = 0
    for name in RENDERED:
        docs = rendered[name]
        for statefulset in find(docs, "StatefulSet"):
            checked += 1
            where = f"{name} StatefulSet/{statefulset['metadata']['name']}"
            labels = statefulset["spec"]["template"]["metadata"]["labels"]
            governing = find(docs, "Service", statefulset["spec"]["serviceName"])
            assert governing, f"{where}: serviceName {statefulset['spec']['serviceName']} is not rendered"
            assert governing[0]["spec"].get("clusterIP") == "None", f"{where}: its serviceName is not headless"
            assert matches(governing[0]["spec"]["selector"], labels), f"{where}: the headless Service selects other pods"
            clients = [
                s for s in find(docs, "Service")
                if s["spec"].get("clusterIP") != "None" and matches(s["spec"]["selector"], labels)
            ]
            assert clients, f"{where}: no ClusterIP Service for clients"
    assert checked


def test_every_helm_install_is_pinned_to_a_chart_version() -> None:
    """`helm install` without --version takes whatever the chart repository serves that day: another
    Milvus than the one these manifests were written for, values keys that no longer exist."""
    commands = []
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *K8S.rglob("*.md"), *K8S.rglob("*.yaml")]:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())  # continued lines joined
        commands += [(path.name, m.group(0)) for m in re.finditer(r"helm (?:install|upgrade)[^\n`]*", text)]
    assert len(commands) >= 5, commands
    for where, command in commands:
        assert re.search(r"--version \d+\.\d+\.\d+", command), f"{where}: {command}"
    # The Milvus chart's version is the one whose Milvus is the image every manifest names.
    values = yaml.safe_load((K8S / "milvus-cluster" / "values.yaml").read_text())
    assert values["image"]["all"]["tag"] == "v2.5.10", "pin the matching chart (4.2.47 serves Milvus 2.5.10)"
    assert all("4.2.47" in c for _, c in commands if "milvus/milvus " in c)


def test_the_kind_cluster_can_run_the_ingress_controller_and_the_readme_uses_it() -> None:
    config = yaml.safe_load((K8S / "kind-cluster.yaml").read_text())
    (node,) = config["nodes"]
    assert 'node-labels: "ingress-ready=true"' in node["kubeadmConfigPatches"][0]
    assert {(m["containerPort"], m["hostPort"]) for m in node["extraPortMappings"]} == {(80, 80), (443, 443)}
    readme = (K8S / "README.md").read_text()
    assert "kind create cluster --name ris --config k8s/kind-cluster.yaml" in readme
    assert "metrics-server" in readme and "need a CNI that enforces them" not in readme
