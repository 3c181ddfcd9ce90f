"""Kubernetes manifests (k8s/) wired to the code: every RIS_* variable is a setting and the API's resolve to
valid Settings; Services target declared container ports; the probes hit endpoints the bento serves; the
embedder Deployment runs service.py's Embedder (on a GPU in the GPU overlays); the ingest Job's flags,
shards and volumes agree with `python -m ingest`.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest

from bento.core.config import setting_fields, settings_from
from tests.k8s_support import (
    INGEST,
    K8S,
    RENDERED,
    WORKLOADS,
    bento_containers,
    container_env,
    containers,
    find,
    matches,
    one,
    pod_templates,
    rendering_context,
    requires_kubectl,
    service_routes,
)
from tests.support import ROOT, service_link_env

pytestmark = requires_kubectl


def test_every_ris_variable_is_a_settings_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = {env_name for env_name, _ in setting_fields()}
    names: set[str] = set()
    for name in RENDERED:
        for _, template in pod_templates(rendered[name]):
            for container in containers(template):
                names |= {v for v in container_env(container, rendering_context(rendered, name)) if v.startswith("RIS_")}
    for secret in find(rendered["secrets"], "Secret"):
        names |= {k for k in secret.get("data", {}) if k.startswith("RIS_")}
    assert names, "no RIS_ settings found"
    unknown = sorted(n for n in names if n not in known)
    assert not unknown, f"not settings of bento.core.config.Settings: {unknown}"


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_pods_start_with_the_variables_kubernetes_injects_for_services(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Kubernetes injects RIS_API_PORT=tcp://..., RIS_MILVUS_SERVICE_HOST=... for the product's own
    Services (named ris-*): the settings once refused them as unknown RIS_* variables and every bento pod
    crash-looped. The pods turn service links off, and the settings ignore them even where they are on."""
    docs = rendered[overlay]
    for _, template in pod_templates(docs):
        assert template["spec"].get("enableServiceLinks") is False, template["metadata"].get("labels")
    links = service_link_env(docs)
    ris_links = {k: v for k, v in links.items() if k.startswith("RIS_")}
    assert {"RIS_API_PORT", "RIS_API_SERVICE_HOST"} <= set(ris_links), sorted(links)
    checked = 0
    for workload, container in bento_containers(docs):
        env = {k: v["value"] for k, v in container_env(container, docs).items() if "value" in v}
        without = settings_from(env)
        assert settings_from({**env, **links}) == without, f"{workload}: a service-link variable changed a setting"
        checked += 1
    assert checked >= 2, "the API and the embedder at least"


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_api_has_the_settings_a_deployment_needs(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    api = next(c for w, c in bento_containers(docs) if w == "ris-api")
    env = container_env(api, docs)
    value = {k: v["value"] for k, v in env.items() if "value" in v}
    secrets = {s["metadata"]["name"]: set(s["data"]) for s in find(rendered["secrets"], "Secret")}

    assert value["RIS_STORE_BACKEND"] == "s3"
    # Behind the Ingress every client arrives from the controller: without trusted proxies one client's
    # requests would throttle everyone's.
    assert settings_from({"RIS_LIMITS_TRUSTED_PROXIES": value["RIS_LIMITS_TRUSTED_PROXIES"]}).limits.trusted_networks
    assert value["RIS_S3_BUCKET"]
    for key in ("RIS_S3_ACCESS_KEY", "RIS_S3_SECRET_KEY"):
        secret, secret_key = env[key]["secret"]
        assert secret_key in secrets[secret], f"{key}: Secret {secret} has no key {secret_key}"
    minio_host, minio_port = value["RIS_S3_ENDPOINT"].split(":")
    minio = one(docs, "Service", minio_host)
    assert int(minio_port) in {p["port"] for p in minio["spec"]["ports"]}

    milvus_uri = value["RIS_MILVUS_URI"]
    assert milvus_uri.startswith("http://"), "the API needs a Milvus server (Lite is one process per file)"
    milvus_host, milvus_port = milvus_uri.removeprefix("http://").split(":")
    if "." not in milvus_host:  # in this namespace: the Service must be rendered here
        assert int(milvus_port) in {p["port"] for p in one(docs, "Service", milvus_host)["spec"]["ports"]}
    else:
        assert overlay == "overlays/gpu-milvus-cluster" and milvus_host == "ris-milvus.milvus"

    embedder_host, embedder_port = value["RIS_SERVICES_EMBEDDER_URL"].removeprefix("http://").split(":")
    embedder_service = one(docs, "Service", embedder_host)
    assert embedder_service["spec"]["selector"]["app.kubernetes.io/component"] == "embedder"
    assert int(embedder_port) in {p["port"] for p in embedder_service["spec"]["ports"]}

    # The resolved environment builds a valid Settings object (secrets replaced by placeholders), with the
    # refusals the product makes at start.
    settings = settings_from({key: how.get("value", "placeholder") for key, how in env.items() if not how.get("optional")})
    assert settings.store.backend == "s3" and not settings.milvus.is_lite and settings.services.embedder_url


def test_services_target_declared_container_ports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    service_ports = ingress_paths = 0
    for name in WORKLOADS:
        docs = rendered[name]
        for service in find(docs, "Service"):
            pods = [t for _, t in pod_templates(docs) if matches(service["spec"]["selector"], t["metadata"]["labels"])]
            assert pods, f"{name}: Service {service['metadata']['name']} selects no pod"
            for port in service["spec"]["ports"]:
                for template in pods:
                    declared = {(p.get("name"), p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports", [])}
                    target = port["targetPort"]
                    assert any(target in pair for pair in declared), f"{name}: {service['metadata']['name']}:{target}"
                    service_ports += 1
        for ingress in find(docs, "Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    service = one(docs, "Service", backend["name"])
                    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
                    ingress_paths += 1
    assert service_ports, "no Service port rendered: nothing was checked"
    assert ingress_paths, "no Ingress path rendered: nothing was checked"


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
    api_routes = routes | {p for m, p, _ in service_routes()[0] if m == "GET"}
    assert "/ready" in api_routes, "service.py serves no GET /ready (the API's readinessProbe)"
    served = {"ris-api": api_routes, "ris-embedder": routes}
    expected_readiness = {"ris-api": "/ready", "ris-embedder": "/readyz"}
    probed = 0
    for name in WORKLOADS:
        for workload, container in bento_containers(rendered[name]):
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
            probed += 1
    assert probed, "no container runs a bento image: no probe was checked"
    # /metrics: BentoML's in the embedder; in the API, BentoML's request metrics and route are off
    # (service.py: metrics={"enabled": False}) and the app serves its own.
    api_own = {p for m, p, _ in service_routes()[0] if m == "GET"}
    assert "/metrics" in api_own, "service.py serves no GET /metrics (BentoML's is off for the API)"
    scraped = 0
    for template in ("overlays/gpu", "overlays/keda"):
        for monitor in find(rendered[template], "ServiceMonitor"):
            for endpoint in monitor["spec"]["endpoints"]:
                if monitor["metadata"]["name"] == "ris-bento":  # the others scrape Milvus, etcd, MinIO
                    assert endpoint["path"] in api_own and endpoint["path"] in routes, endpoint["path"]
                    scraped += 1
    assert scraped, "no ServiceMonitor endpoint scrapes the bento: no scrape path was checked"


def test_embedder_deployment_serves_the_embedder_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = _service_names()
    assert {"Embedder", "ImageSearch"} <= set(names)
    for name in WORKLOADS:
        embedder = next(c for w, c in bento_containers(rendered[name]) if w == "ris-embedder")
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
        deployment = one(docs, "Deployment", "ris-embedder")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert deployment["spec"]["template"]["spec"]["nodeSelector"]
        assert container_env(container, docs)["RIS_MODEL_DEVICE"]["value"] == "cuda"
        api = one(docs, "Deployment", "ris-api")["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in api["resources"]["limits"]
    cpu = one(rendered["overlays/cpu"], "Deployment", "ris-embedder")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"] and "nodeSelector" not in cpu


@pytest.mark.parametrize("job_dir", INGEST)
def test_ingest_job_is_sharded_and_wired(rendered: dict[str, list[dict[str, Any]]], job_dir: str) -> None:
    docs = rendered[job_dir]
    job = one(docs, "Job", "ris-ingest")
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
    api_service = one(rendered["overlays/cpu"], "Service", service_url.removeprefix("http://").split(":")[0])
    assert api_service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    env = container_env(container, rendered["overlays/cpu"])
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
        setup = one(rendered["overlays/cpu"], "Job", "ris-minio-setup")["spec"]["template"]["spec"]["containers"][0]
        assert bucket == container_env(setup, rendered["overlays/cpu"])["INCOMING_BUCKET"]["value"]
        assert env["RIS_S3_ACCESS_KEY"]["secret"][0] == container_env(setup, rendered["overlays/cpu"])["APP_ACCESS_KEY"]["secret"][0]
    else:
        assert source in mounts
        claims = [v for v in volumes if "persistentVolumeClaim" in v]
        assert claims and all(v["persistentVolumeClaim"]["readOnly"] for v in claims)


def test_rollouts_stops_and_runs_end_on_a_real_cluster(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A GPU Deployment never surges (a surge pod waits for a spare GPU that a GPU pool rarely has); Milvus
    gets time to flush on stop; the ingest Job has a deadline (a stuck run ends and alerts)."""
    gpu_checked = 0
    for overlay in WORKLOADS:
        for workload, template in pod_templates(rendered[overlay]):
            gpus = [c for c in containers(template) if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
            if gpus and workload["kind"] == "Deployment":
                rolling = workload["spec"]["strategy"]["rollingUpdate"]
                assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] >= 1, f"{overlay}: {rolling}"
                gpu_checked += 1
            if workload["metadata"]["name"] == "ris-milvus":
                assert template["spec"]["terminationGracePeriodSeconds"] >= 60, overlay
    assert gpu_checked >= 2, "the gpu and keda overlays' embedders"
    for name in INGEST:
        job = next(w for w, _ in pod_templates(rendered[name]) if w["kind"] == "Job")
        assert 3600 <= job["spec"]["activeDeadlineSeconds"] <= 7 * 86400, name


def _bucket_of(path: str) -> tuple[str, str]:
    alias, _, rest = path.partition("/")
    return alias, rest.split("/")[0]


def test_backup_and_restore_pods_hand_each_other_the_same_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The backup pod's steps write and upload the same folder, with flags `python -m ingest.backup` has;
    the restore pod fetches what the backup uploaded, puts the originals back before the rows, and runs
    the restore on that folder. The buckets mirrored are the ones the setup Job creates, read with the
    least-privilege user that owns each."""
    cli = (ROOT / "ingest" / "backup.py").read_text()
    (cron,) = find(rendered["jobs/backup"], "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    backup_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    steps = {c["name"]: c for c in containers({"spec": backup_pod})}
    assert [c["name"] for c in backup_pod["initContainers"]] == ["etcd-snapshot", "collection"]
    collection = steps["collection"]["args"]
    assert collection[:4] == ["python", "-m", "ingest.backup", "backup"]
    for flag in (a.split("=")[0] for a in collection if a.startswith("--")):
        assert f'"{flag}"' in cli, f"python -m ingest.backup has no {flag}"
    folder = collection[4]
    snapshot = steps["etcd-snapshot"]["command"]
    assert snapshot[:2] == ["etcdctl", "--endpoints=http://ris-etcd:2379"] and snapshot[-1].startswith(folder + "/")
    etcd = one(rendered["overlays/cpu"], "Service", "ris-etcd")
    assert any(p["port"] == 2379 for p in etcd["spec"]["ports"])

    def mount(container: dict[str, Any], volume: str) -> str:
        return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)

    for name in ("etcd-snapshot", "collection", "upload"):
        assert mount(steps[name], "backups") == folder, name
    assert steps["upload"]["args"][-2:] == [folder, "target/ris-backups"]

    setup = one(rendered["overlays/cpu"], "Job", "ris-minio-setup")["spec"]["template"]["spec"]["containers"][0]
    setup_env = container_env(setup, rendered["overlays/cpu"])
    mirrored = {_bucket_of(steps[name]["args"][-2]): _bucket_of(steps[name]["args"][-1]) for name in ("images", "milvus")}
    assert mirrored == {
        ("ris", setup_env["IMAGES_BUCKET"]["value"]): ("target", "ris-images"),
        ("milvus", setup_env["MILVUS_BUCKET"]["value"]): ("target", "ris-milvus"),
    }
    env = container_env(steps["images"], rendered["overlays/cpu"])
    assert env["APP_ACCESS_KEY"]["secret"][0] == setup_env["APP_ACCESS_KEY"]["secret"][0], "the images bucket's user"
    assert env["MILVUS_ACCESS_KEY"]["secret"][0] == setup_env["MILVUS_ACCESS_KEY"]["secret"][0], "the milvus bucket's user"
    assert env["MC_HOST_target"]["secret"] == ("ris-backup-target", "MC_HOST_target")
    defined = [e["name"] for e in steps["images"]["env"]]
    for item in steps["images"]["env"]:  # $(VAR) expands only from variables defined before it
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", item.get("value", "")):
            assert var in defined[: defined.index(item["name"])], f"$({var}) in {item['name']}"

    restore_pod = one(rendered["jobs/restore"], "Job", "ris-restore")["spec"]["template"]["spec"]
    steps = {c["name"]: c for c in containers({"spec": restore_pod})}
    assert [c["name"] for c in restore_pod["initContainers"]] == ["fetch", "images"], "originals before rows"
    assert steps["fetch"]["args"][-2] == "target/ris-backups" and steps["images"]["args"][-2:] == ["target/ris-images", "ris/images"]
    restore = steps["restore"]["args"]
    assert restore[:5] == ["python", "-m", "ingest.backup", "restore", steps["fetch"]["args"][-1]]
    assert mount(steps["fetch"], "backups") == mount(steps["restore"], "backups") == restore[4]
    for flag in (a.split("=")[0] for a in restore if a.startswith("--")):
        assert f'"{flag}"' in cli, f"python -m ingest.backup restore has no {flag}"
