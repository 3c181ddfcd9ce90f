"""Kubernetes manifests (k8s/): scaling and monitoring. Every Deployment is autoscaled (HPA or KEDA) with a
disruption budget and leaves replicas to its autoscaler; ServiceMonitors select the Services of their
rendering and carry the Prometheus release label; the autoscaling queries (KEDA triggers, prometheus-adapter
rules) read the product's metrics by the label names Prometheus stores; image ids in request paths are
folded into route templates; the bento pods drain before they stop.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import yaml

from bento.core.metrics import INTERNAL, LABELS, UNMATCHED
from tests.k8s_support import (
    K8S,
    RENDERED,
    WORKLOADS,
    bento_containers,
    find,
    matches,
    one,
    pod_templates,
    requires_kubectl,
    service_routes,
)
from tests.support import ROOT

pytestmark = requires_kubectl


def test_every_deployment_scales_and_has_a_disruption_budget(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for name in WORKLOADS:
        docs = rendered[name]
        scalers = {h["spec"]["scaleTargetRef"]["name"]: h for h in find(docs, "HorizontalPodAutoscaler")}
        scalers |= {s["spec"]["scaleTargetRef"]["name"]: s for s in find(docs, "ScaledObject")}
        for deployment in find(docs, "Deployment"):
            checked += 1
            dep = deployment["metadata"]["name"]
            assert dep in scalers, f"{name}: no autoscaler for {dep}"
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert any(matches(p["spec"]["selector"]["matchLabels"], labels) for p in find(docs, "PodDisruptionBudget"))
            hpa = scalers[dep]
            if hpa["kind"] == "HorizontalPodAutoscaler":
                kinds = [m["type"] for m in hpa["spec"]["metrics"]]
                assert "Resource" in kinds, "CPU is the fallback metric"
                if name != "overlays/cpu":
                    assert kinds[0] == "Pods" and hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "ris_in_flight_requests"
    assert checked, "no Deployment rendered: nothing was checked"
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    assert [r["name"]["as"] for r in rules["rules"]["custom"]] == ["ris_in_flight_requests"]


def _autoscaled(docs: list[dict[str, Any]]) -> set[str]:
    refs = [h["spec"]["scaleTargetRef"] for h in find(docs, "HorizontalPodAutoscaler") + find(docs, "ScaledObject")]
    return {r["name"] for r in refs if r.get("kind", "Deployment") == "Deployment"}


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """spec.replicas on an autoscaled Deployment is reset by every `kubectl apply` (and wakes a GPU pod
    that KEDA scaled to zero)."""
    for name in WORKLOADS:
        targets = _autoscaled(rendered[name])
        assert targets, f"{name}: nothing is autoscaled"
        for target in targets:
            deployment = one(rendered[name], "Deployment", target)
            assert "replicas" not in deployment["spec"], f"{name}: Deployment {target} sets replicas and is autoscaled"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not matches(selector.get("matchLabels", {}), labels):
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
    checked = 0
    for name in RENDERED:
        docs = rendered[name]
        for monitor in find(docs, "ServiceMonitor"):
            where = f"{name} ServiceMonitor/{monitor['metadata']['name']}"
            namespaces = monitor["spec"].get("namespaceSelector", {}).get("matchNames", [monitor["metadata"]["namespace"]])
            services = [
                s for s in find(docs, "Service")
                if s["metadata"]["namespace"] in namespaces and _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
            ]
            assert services, f"{where} selects no Service in this rendering"
            for endpoint in monitor["spec"]["endpoints"]:
                scraped: list[str] = []
                for service in services:
                    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, f"{where}: {service['metadata']['name']}"
                    scraped += [
                        w["metadata"]["name"] for w, t in pod_templates(docs)
                        if matches(service["spec"]["selector"], t["metadata"]["labels"])
                    ]
                assert len(scraped) == len(set(scraped)), f"{where}: pods scraped twice (through two Services): {scraped}"
                checked += 1
    assert checked, "no ServiceMonitor endpoint rendered: nothing was checked"


def test_service_monitors_carry_the_prometheus_release_label(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """kube-prometheus-stack's Prometheus selects ServiceMonitors by `release: <Helm release>`."""
    values = yaml.safe_load((K8S / "milvus-cluster" / "values.yaml").read_text())
    release = values["metrics"]["serviceMonitor"]["additionalLabels"]["release"]
    assert values["metrics"]["serviceMonitor"]["enabled"] is True
    monitors = [m for name in RENDERED for m in find(rendered[name], "ServiceMonitor")]
    assert monitors
    for monitor in monitors:
        assert monitor["metadata"]["labels"].get("release") == release, monitor["metadata"]["name"]


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
        bento = [s for s in find(docs, "Service") if s["metadata"]["name"] in ("ris-api", "ris-embedder")]
        for monitor in find(docs, "ServiceMonitor"):
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
    scaled = one(rendered["overlays/keda"], "ScaledObject", "ris-embedder")
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
    api_templates = {re.sub(r"\{([^}:]+)(:[^}]*)?\}", r"{\1}", p) for _, p, _ in service_routes()[0]}
    api_templates |= {f"{m}/{{path}}" for m in service_routes()[1] if not m.endswith(".json") and m != "/docs"}
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
        t["metadata"]["query"] for t in one(rendered["overlays/keda"], "ScaledObject", "ris-embedder")["spec"]["triggers"]
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
    checked = 0
    for name in WORKLOADS:
        for workload, container in bento_containers(rendered[name]):
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, f"{name} {workload}: {command}"
            delay = float(command[1])
            assert 5 <= delay <= 30, f"{name} {workload}: preStop sleep {delay}"
            grace = one(rendered[name], "Deployment", workload)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > delay + timeouts[entry[workload]], f"{name} {workload}: grace {grace} s"
            checked += 1
    assert checked, "no container runs a bento image: nothing was checked"


def test_image_ids_in_request_paths_are_rewritten_before_prometheus_stores_them(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """BentoML labels each request with its raw path: without a rewrite every image read through the API
    (/api/images/<sha256>, .../thumbnail, .../metadata) is a series of its own. The relabeling must fold
    exactly those into route templates and leave every other route as it is (Prometheus anchors the regex
    and writes $1 for the first group)."""
    path_label = _path_label(_bento_honor_labels(rendered))
    monitor = one(rendered["overlays/gpu"], "ServiceMonitor", "ris-bento")
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


def test_scale_to_zero_fails_loudly_and_keeps_the_hpa_behaviour(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Missing metrics must not read as "no requests" and hold the embedder at zero (every upload search a
    503, nothing alerting): the wake-up trigger errors on an empty answer, and after three errors KEDA's
    fallback runs one embedder. The scale-out trigger's empty answer (no embedder running) is an explicit 0.
    The HPA that KEDA makes behaves like the base HPA the overlay deletes."""
    scaled = one(rendered["overlays/keda"], "ScaledObject", "ris-embedder")["spec"]
    assert scaled["minReplicaCount"] == 0
    fallback = scaled["fallback"]
    assert fallback["replicas"] >= 1 and 1 <= fallback["failureThreshold"] <= 5, fallback
    triggers = scaled["triggers"]
    assert triggers and all(t["type"] == "prometheus" for t in triggers)
    for trigger in triggers:
        metadata = trigger["metadata"]
        # KEDA's fallback applies to AverageValue triggers only (the prometheus scaler's default).
        assert trigger.get("metricType", "AverageValue") == "AverageValue", trigger["name"]
        explicit_zero = metadata["query"].rstrip().endswith("or vector(0)")
        assert metadata.get("ignoreNullValues") == "false" or explicit_zero, f"{trigger['name']}: an empty answer reads as 0"
    wake_up = next(t for t in triggers if "activationThreshold" in t["metadata"])
    assert wake_up["metadata"].get("ignoreNullValues") == "false", "the wake-up trigger must fail on missing metrics"
    base = one(rendered["overlays/gpu"], "HorizontalPodAutoscaler", "ris-embedder")["spec"]["behavior"]
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == base
    assert not find(rendered["overlays/keda"], "HorizontalPodAutoscaler", "ris-embedder"), "KEDA owns the embedder's HPA"
