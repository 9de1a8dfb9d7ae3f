"""deploy/k8s: every overlay renders with kustomize and validates against the Kubernetes schemas;
the pieces refer to each other correctly (Service → pods, ServiceMonitor → Service, HPA →
Deployment and the adapter's metric)."""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import yaml

try:
    import jsonschema
    import kubernetes_validate
except ImportError as exc:  # fail loudly, as the other tool checks do
    raise ImportError(f"{exc.name} is missing: pip install -e '.[test]', as .ci/run does") from exc

from tests.deploy.conftest import (K8S, OVERLAYS, ROOT, RULE_FILES, exported_metric_names, promql_names,
                                   run, tool)

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest we aim at, newest bundled with kubernetes-validate
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # the Prometheus Operator's, not in those schemas

# A subset of the Prometheus Operator's ServiceMonitor CRD schema: the fields used here, spelled
# as the CRD spells them; unknown fields are errors.
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scheme": {"enum": ["http", "https"]}}}},
            }},
    },
}


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    out = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def server_container(docs) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_against_the_kubernetes_schemas(overlay, version):
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", *CRD_KINDS}
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_matches_its_schema_subset_and_the_service(overlay):
    docs = render(overlay)
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    # job="layerskip" in the alert rules and the dashboard: the operator names the job after the Service
    assert service["metadata"]["name"] == "layerskip" and "jobLabel" not in monitor["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_is_probed_secured_and_selected(overlay):
    docs = render(overlay)
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in port_names, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model loading needs minutes"
    assert spec["terminationGracePeriodSeconds"] >= 60
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    drain = float(env["LAYERSKIP_TIMEOUT_GRACEFUL_SHUTDOWN"])
    assert drain < spec["terminationGracePeriodSeconds"], "the server must finish draining first"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert {d["metadata"].get("namespace") for d in docs} == {"layerskip"}, "one namespace for all"


def test_gpu_overlays_request_a_gpu_and_the_cpu_overlay_none():
    for overlay in ("gpu", "gpu-pvc"):
        container = server_container(render(overlay))
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"].endswith(":cuda")
        assert {"name": "LAYERSKIP_DEVICE", "value": "cuda"} in container["env"]
    container = server_container(render("cpu"))
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["image"].endswith(":cpu")
    assert {"name": "LAYERSKIP_DEVICE", "value": "cpu"} in container["env"]


def test_the_pvc_overlay_mounts_the_model_volume_read_only():
    docs = render("gpu-pvc")
    claim = one(docs, "PersistentVolumeClaim")
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["LAYERSKIP_MODEL"].startswith(mount["mountPath"] + "/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_server_flags(overlay):
    from server.cli import FLAGS

    flags = {"LAYERSKIP_" + name.upper().replace("-", "_") for name, *_ in FLAGS}
    env = {e["name"] for e in server_container(render(overlay))["env"]}
    assert env <= flags, env - flags


def test_the_hpa_scales_the_deployment_on_the_adapters_queue_metric():
    docs = render("gpu")
    hpa, deployment = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == metric == "layerskip_num_requests_waiting"
    assert promql_names(rule["seriesQuery"]) <= exported_metric_names()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_cpu_fallback_component_replaces_the_hpa_metric(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "hpa-cpu-fallback", tmp_path)]}))
    docs = [d for d in yaml.safe_load_all(run(tool("kubectl"), "kustomize", str(tmp_path)).stdout) if d]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_prometheus_rule_resource_carries_the_rule_files(tmp_path):
    spec = importlib.util.spec_from_file_location("sync", ROOT / "scripts" / "sync_prometheusrule.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == sync.render(), "out of date: run python scripts/sync_prometheusrule.py"
    rule = one(render("gpu"), "PrometheusRule")
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run(tool("promtool"), "check", "rules", str(rules_file))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_key_comes_from_an_optional_secret_and_probes_need_none(overlay):
    from server.auth import is_protected

    docs = render(overlay)
    container = server_container(docs)
    (key,) = [e for e in container["env"] if e["name"] == "LAYERSKIP_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "layerskip-api-key", "key": "api-key",
                                                "optional": True}  # no Secret: starts open
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert not is_protected(container[probe]["httpGet"]["path"]), probe
    assert not any(is_protected(e["path"]) for e in one(docs, "ServiceMonitor")["spec"]["endpoints"])
    assert "--protect-metrics" not in container.get("args", [])
