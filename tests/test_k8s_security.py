"""Kubernetes manifests (k8s/): security. No credential outside k8s/secrets; checkov's enforced checks; pods
locked down (non-root, no privilege escalation, read-only root, limits); NetworkPolicies admit exactly the
pods that need each port; the API's keys come from a mounted Secret and the ingest Jobs send an admin key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_support import (
    INGEST,
    RENDERED,
    WORKLOADS,
    container_env,
    containers,
    find,
    matches,
    one,
    pod_templates,
    rendering_context,
    requires_kubectl,
    tool,
)
from tests.support import ROOT

pytestmark = requires_kubectl


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
    # the bento image's own uid 1034 (the backup pods: in every container, so each step reads the last's files)
    "CKV_K8S_40": {"ris-api", "ris-embedder", "ris-ingest", "ris-backup", "ris-restore"},
    "CKV_K8S_22": {"ris-milvus"},  # Milvus' root filesystem not verified read-only
    "CKV_K8S_116": {"ris-etcd"}, "CKV_K8S_117": {"ris-etcd"}, "CKV_K8S_119": {"ris-etcd"},  # etcd TLS
}


def _component(template: dict[str, Any]) -> str:
    return template["metadata"]["labels"]["app.kubernetes.io/component"]


def test_secrets_are_never_in_workload_renderings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in RENDERED:
        assert not find(rendered[name], "Secret"), f"{name} renders a Secret: credentials belong in k8s/secrets"
    assert {d["metadata"]["name"] for d in find(rendered["secrets"], "Secret")} == {
        "ris-minio-root", "ris-s3", "ris-milvus-s3", "ris-api-keys", "ris-ingest-key", "ris-backup-target",
    }
    for real in ("k8s/secrets/ris-s3.env", "k8s/secrets/ris-ingest-key.env", "k8s/secrets/ris-api-keys"):
        ignored = subprocess.run(["git", "check-ignore", "-q", real], cwd=ROOT, capture_output=True, timeout=30)
        assert ignored.returncode == 0, f"{real} must be git-ignored (real credentials)"
    for committed in ("k8s/secrets/kustomization.yaml", "k8s/secrets/ris-api-keys.example", "k8s/secrets/ris-s3.env.example"):
        ignored = subprocess.run(["git", "check-ignore", "-q", committed], cwd=ROOT, capture_output=True, timeout=30)
        assert ignored.returncode == 1, f"{committed} must not be git-ignored"


def test_no_credentials_in_manifests(rendered: dict[str, list[dict[str, Any]]]) -> None:
    secretish = re.compile(r"(PASSWORD|SECRET|ACCESS_KEY|TOKEN|CLIENT_KEY|AUTH_KEYS$)", re.I)
    credentials = 0
    for name in RENDERED:
        for _, template in pod_templates(rendered[name]):
            for container in containers(template):
                for var, how in container_env(container, rendering_context(rendered, name)).items():
                    credentials += bool(secretish.search(var))
                    assert not (secretish.search(var) and "value" in how), f"{name}: {var} must come from a Secret"
    assert credentials, "no credential variable in any container: the check met nothing"


@pytest.fixture(scope="module")
def checkov_report(rendered_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [tool("checkov"), "-d", str(rendered_dir), "--framework", "kubernetes", "--check", ",".join(ENFORCED_CHECKS),
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
    checked = 0
    for name in RENDERED:
        for workload, template in pod_templates(rendered[name]):
            where = f"{name} {workload['kind']}/{workload['metadata']['name']}"
            spec = template["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["serviceAccountName"] != "default", where
            for container in containers(template):
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert "add" not in context["capabilities"], where
                if workload["metadata"]["name"] != "ris-milvus":
                    assert context["readOnlyRootFilesystem"] is True, where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
                assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
                checked += 1
    assert checked, "no container rendered: nothing was checked"


def _allowed_sources(policies: list[dict[str, Any]], target: dict[str, Any], port: str) -> list[dict[str, Any]]:
    labels = target["metadata"]["labels"]
    sources: list[dict[str, Any]] = []
    for policy in policies:
        if not matches(policy["spec"]["podSelector"].get("matchLabels", {}), labels):
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
    policies = find(docs, "NetworkPolicy")
    deny = one(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    pods = [t for _, t in pod_templates(docs + rendered["jobs/ingest"] + rendered["jobs/backup"] + rendered["jobs/restore"])]

    def who_reaches(component: str, port: str) -> set[str]:
        target = next(t for t in pods if _component(t) == component)
        reach: set[str] = set()
        for source in _allowed_sources(policies, target, port):
            assert source, f"{component}:{port} is open to everything"
            if "podSelector" in source and "namespaceSelector" not in source:
                reach |= {_component(t) for t in pods if matches(source["podSelector"]["matchLabels"], t["metadata"]["labels"])}
            else:
                reach.add("namespace:" + source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        return reach

    assert who_reaches("milvus", "grpc") == {"api", "ingest", "backup", "restore"}
    # Prometheus scrapes MinIO's metrics path on the S3 port (every S3 call still needs keys) and etcd on
    # its metrics port only: etcd's data port stays Milvus'.
    assert who_reaches("minio", "s3") == {"api", "ingest", "milvus", "minio-setup", "backup", "restore", "namespace:monitoring"}
    assert who_reaches("etcd", "client") == {"milvus", "backup"}
    assert who_reaches("etcd", "metrics") == {"namespace:monitoring"}
    assert who_reaches("embedder", "http") == {"api", "namespace:monitoring"}


def _secret_data(rendered: dict[str, list[dict[str, Any]]], name: str) -> dict[str, str]:
    """The decoded data of a Secret rendered by k8s/secrets (from the committed examples)."""
    import base64

    found = find(rendered["secrets"], "Secret", name)
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
    deployment = one(docs, "Deployment", "ris-api")
    template = deployment["spec"]["template"]
    api = next(c for c in template["spec"]["containers"] if c["name"] == "api")
    env = container_env(api, docs)
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
        for workload, template in pod_templates(rendered[name]):
            for container in template["spec"]["containers"]:
                if not any(str(a).startswith("--service-url") for a in container.get("args", [])):
                    continue
                checked += 1
                where = f"{name} {workload['metadata']['name']}"
                assert not any(str(a).startswith("--api-key") for a in container["args"]), f"{where}: a key in the args"
                how = container_env(container, rendering_context(rendered, name)).get("RIS_AUTH_CLIENT_KEY")
                assert how is not None and "secret" in how, f"{where}: --service-url without RIS_AUTH_CLIENT_KEY from a Secret"
                assert not how["optional"], f"{where}: the client key must not be optional"
                secret, key = how["secret"]
                assert key in _secret_data(rendered, secret), f"{where}: Secret {secret} has no key {key}"
    assert checked, "no ingest Job uses --service-url any more: remove the ris-ingest-key Secret"


def test_ingest_pods_reach_minio_milvus_and_the_api(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Both ingest Jobs read and write MinIO, write Milvus and embed through the API: the NetworkPolicies
    (default deny) must admit them."""
    for overlay in ("overlays/cpu", "overlays/gpu", "overlays/keda"):
        docs = rendered[overlay]
        policies = find(docs, "NetworkPolicy")
        targets = {_component(t): t for _, t in pod_templates(docs)}
        for job in INGEST:
            (template,) = [t for _, t in pod_templates(rendered[job])]
            for component, port in (("minio", "s3"), ("milvus", "grpc"), ("api", "http")):
                sources = _allowed_sources(policies, targets[component], port)
                admitted = any(
                    not source or ("podSelector" in source and "namespaceSelector" not in source
                                   and matches(source["podSelector"].get("matchLabels", {}), template["metadata"]["labels"]))
                    for source in sources
                )
                assert admitted, f"{overlay}: {job} pods cannot reach {component}:{port}"


# --- egress: every connection a pod's settings name is allowed on both sides, and nothing else ----------
_SERVICE_REF = re.compile(r"(?:https?://(?:[^@/\s]*@)?)?\b(ris-[a-z0-9-]+?)(?:\.ris(?:\.svc(?:\.cluster\.local)?)?)?:(\d+)\b")


def _peer_matches(peer: dict[str, Any], labels: dict[str, str], namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # ipBlocks are for addresses off the cluster here
    if "namespaceSelector" in peer:
        wanted = peer["namespaceSelector"].get("matchLabels", {})
        if wanted and wanted.get("kubernetes.io/metadata.name") != namespace:
            return False
    elif namespace != "ris":
        return False
    return matches(peer.get("podSelector", {}).get("matchLabels", {}), labels)


def _rule_allows(rule: dict[str, Any], peers_key: str, labels: dict[str, str], namespace: str, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if ports is not None and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
        return False
    peers = rule.get(peers_key)
    return peers is None or any(_peer_matches(peer, labels, namespace) for peer in peers)


def _egress_allowed(policies, source: dict[str, Any], labels: dict[str, str], namespace: str, port: int, protocol: str = "TCP") -> bool:
    selecting = [
        p for p in policies
        if "Egress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"].get("matchLabels", {}), source["metadata"]["labels"])
    ]
    assert selecting, f"{_component(source)}: no egress policy selects it (egress would be open)"
    return any(_rule_allows(rule, "to", labels, namespace, port, protocol) for p in selecting for rule in p["spec"].get("egress", []))


def _ingress_allowed(policies, target: dict[str, Any], source_labels: dict[str, str], port_name: str) -> bool:
    sources = _allowed_sources(policies, target, port_name)
    return any(not s or _peer_matches(s, source_labels, "ris") for s in sources)


def _connections(template: dict[str, Any], docs: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(Service name, port) of every in-namespace Service a pod's containers name in their settings,
    commands and arguments (RIS_MILVUS_URI, ETCD_ENDPOINTS, --service-url=..., mc alias URLs...)."""
    found: set[tuple[str, int]] = set()
    for container in containers(template):
        texts = [str(v.get("value", "")) for v in container_env(container, docs).values()]
        texts += [str(a) for a in container.get("command", []) + container.get("args", [])]
        for text in texts:
            found |= {(name, int(port)) for name, port in _SERVICE_REF.findall(text)}
    return found


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu", "overlays/keda"])
def test_every_connection_a_pod_is_configured_for_is_allowed_both_ways_and_no_other(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay] + rendered["jobs/ingest"] + rendered["jobs/backup"] + rendered["jobs/restore"]
    policies = find(docs, "NetworkPolicy")
    assert one(docs, "NetworkPolicy", "default-deny-egress")["spec"] == {"podSelector": {}, "policyTypes": ["Egress"]}
    pods = [t for _, t in pod_templates(docs)]
    dns = {"k8s-app": "kube-dns"}
    checked: set[tuple[str, str]] = set()
    for source in pods:
        who = _component(source)
        assert _egress_allowed(policies, source, dns, "kube-system", 53, "UDP"), f"{who}: no DNS"
        for service_name, port in _connections(source, docs):
            service = one(docs, "Service", service_name)
            (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
            if matches(service["spec"]["selector"], source["metadata"]["labels"]):
                continue  # its own address (etcd's --advertise-client-urls)
            targets = [t for t in pods if matches(service["spec"]["selector"], t["metadata"]["labels"])]
            assert targets, f"{who} -> {service_name}: no pod behind it"
            for target in targets:
                (number,) = [
                    c["containerPort"] for c in containers(target) for c in c.get("ports", []) if c["name"] == service_port["targetPort"]
                ]
                labels = target["metadata"]["labels"]
                assert _egress_allowed(policies, source, labels, "ris", number), f"{who} -> {service_name}:{port} (egress)"
                assert _ingress_allowed(policies, target, source["metadata"]["labels"], service_port["targetPort"]), (
                    f"{who} -> {service_name}:{port} (ingress)"
                )
                checked.add((who, _component(target)))
    assert {("api", "embedder"), ("api", "milvus"), ("api", "minio"), ("milvus", "etcd"), ("milvus", "minio"),
            ("minio-setup", "minio"), ("ingest", "api"), ("backup", "etcd"), ("backup", "milvus"), ("restore", "minio")} <= checked, checked

    # Nothing else in the namespace: the embedder, etcd and MinIO reach no pod; no rule is open to every
    # address and port; the API reaches the internet on 80/443 only, never a private range.
    for component in ("embedder", "etcd", "minio"):
        source = next(t for t in pods if _component(t) == component)
        for target in pods:
            for port in (3000, 19530, 9000, 2379):
                assert not _egress_allowed(policies, source, target["metadata"]["labels"], "ris", port), (component, _component(target))
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule open on every port"
            if "to" not in rule:
                assert {p["port"] for p in rule["ports"]} == {443}, policy["metadata"]["name"]
    api_web = [peer["ipBlock"] for rule in one(docs, "NetworkPolicy", "egress-api")["spec"]["egress"] for peer in rule["to"] if "ipBlock" in peer]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(api_web[0]["except"])
    assert {"fc00::/7", "fe80::/10"} <= set(api_web[1]["except"])


def test_with_milvus_in_cluster_mode_the_clients_reach_its_namespace_and_the_backup_skips_etcd(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["overlays/gpu-milvus-cluster"] + rendered["jobs/ingest"] + rendered["jobs/backup-milvus-cluster"]
    policies = find(docs, "NetworkPolicy")
    uri = one(docs, "ConfigMap", "ris-settings")["data"]["RIS_MILVUS_URI"]
    host, port = uri.removeprefix("http://").split(":")
    namespace = host.split(".")[1]
    proxy = {"app.kubernetes.io/component": "proxy", "app.kubernetes.io/name": "milvus"}
    for _, template in pod_templates(docs):
        if template["metadata"]["labels"].get("ris.example.com/milvus-client") == "true":
            assert _egress_allowed(policies, template, proxy, namespace, int(port)), _component(template)
    assert not find(docs, "NetworkPolicy", "egress-milvus"), "no standalone Milvus to allow"
    (cron,) = find(rendered["jobs/backup-milvus-cluster"], "CronJob")
    spec = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert [c["name"] for c in spec["spec"]["initContainers"]] == ["collection"]
    assert "ris.example.com/etcd-client" not in spec["metadata"]["labels"]
