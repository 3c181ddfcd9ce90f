"""Kubernetes manifests (k8s/): the alerts. The PrometheusRule of the gpu overlays passes `promtool check
rules`, and every alert has a unit test that `promtool test rules` runs (k8s/monitoring/rules-test.yaml:
input series, the alerts expected to fire and, as important, not to); the Grafana dashboard's queries are
valid PromQL on the product's metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from bento.core.metrics import LABELS
from tests.k8s_support import K8S, find, one, requires_kubectl

pytestmark = requires_kubectl
PROMTOOL = shutil.which("promtool")
ALERTING = ["overlays/gpu", "overlays/keda", "overlays/gpu-milvus-cluster"]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL, "promtool is missing: Debian's `prometheus` package has it (scripts/test.sh installs it)"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules(rendered: dict[str, list[dict[str, Any]]], overlay: str = "overlays/gpu") -> dict[str, Any]:
    return one(rendered[overlay], "PrometheusRule", "ris-alerts")


def _alerts(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]


def test_the_alerts_pass_promtool_and_their_unit_tests(rendered, tmp_path):
    rule = _rules(rendered)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(K8S / "monitoring" / "rules-test.yaml", tmp_path / "rules-test.yaml")
    checked = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "rules-test.yaml", cwd=tmp_path)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout[-4000:] + tested.stderr[-2000:]


def test_every_alert_is_unit_tested_and_deployed_where_prometheus_runs(rendered):
    rule = _rules(rendered)
    alerts = {a["alert"] for a in _alerts(rule)}
    assert {
        "RisApiErrorRatioHigh", "RisEmbedderUnavailable", "RisEmbedderWakeUpStuck", "RisEmbedderColdStartsFrequent",
        "RisKedaScalerErrors", "RisBackendDown", "RisBackendUnavailable", "RisEtcdDatabaseNearQuota", "RisVolumeFilling", "RisIngestJobFailed",
    } <= alerts
    tests = yaml.safe_load((K8S / "monitoring" / "rules-test.yaml").read_text())["tests"]
    tested = [case for test in tests for case in test["alert_rule_test"]]
    assert {case["alertname"] for case in tested} == alerts, "an alert without a unit test"
    assert {case["alertname"] for case in tested if case["exp_alerts"]} == alerts, "an alert never seen firing"
    monitors = find(rendered["overlays/gpu"], "ServiceMonitor")
    assert monitors and rule["metadata"]["labels"]["release"] == monitors[0]["metadata"]["labels"]["release"]
    for overlay in ALERTING:
        assert find(rendered[overlay], "PrometheusRule", "ris-alerts"), overlay
    for alert in _alerts(rule):
        assert 'namespace="ris"' in alert["expr"], f"{alert['alert']} reads other namespaces"
        assert alert["labels"]["severity"] in {"critical", "warning", "info"} and alert["annotations"]["summary"]


def test_the_dashboard_reads_the_product_s_metrics_with_valid_promql(tmp_path):
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 6, exprs
    product = set(LABELS) | {"ris_http_request_duration_seconds_bucket"}
    used = {metric for expr in exprs for metric in product if metric in expr}
    assert {"ris_http_requests_total", "ris_http_requests_in_progress", "ris_embedder_requests_total"} <= used
    # promtool parses each expression as a recording rule (Grafana's $__rate_interval as a fixed window).
    records = [{"record": f"dashboard:panel{i}", "expr": expr.replace("$__rate_interval", "5m")} for i, expr in enumerate(exprs)]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = _promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
