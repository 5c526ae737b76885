"""deploy/kubernetes: valid manifests, restricted pods, names that agree, rules = rules.yml."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules.yml"
# The oldest Kubernetes still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return loaded


def manifests() -> list[dict[str, Any]]:
    docs = []
    for resource in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((BASE / resource).read_text()) if d]
    return docs


def manifest(kind: str) -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (exporter,) = manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = exporter
    return found


def arg(name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in container()["args"] if a.startswith(f"{name}=")]
    return value


def mount_for(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volumeMount holding `path` and its volume."""
    mounts = [m for m in container()["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no mounted volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = manifest("Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    return mount, volume


def test_kustomization_lists_every_manifest_and_only_existing_ones() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "document",
    [m for m in manifests() if m["kind"] not in CRD_KINDS],
    ids=lambda m: m["kind"],
)
def test_core_manifests_validate_against_the_kubernetes_schema(
    document: dict[str, Any], version: str
) -> None:
    kubernetes_validate.validate(document, version, strict=True)


def test_the_deployment_is_restricted() -> None:
    """Pod Security Standards, `restricted` profile, plus a read-only root filesystem."""
    pod = manifest("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert all("hostPath" not in v for v in pod["volumes"])
    security = container()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not security.get("privileged")


def test_probes_use_the_health_and_readiness_endpoints() -> None:
    port_names = {p["name"] for p in container()["ports"]}
    assert container()["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container()["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container()[probe]["httpGet"]["port"] in port_names
    assert arg("--web.listen-address").endswith(":9867")
    assert {p["containerPort"] for p in container()["ports"]} == {9867}


def test_state_store_is_on_the_persistent_volume_claim_with_a_single_writer() -> None:
    mount, volume = mount_for(arg("--storage.path"))
    assert volume["persistentVolumeClaim"]["claimName"] == manifest(
        "PersistentVolumeClaim"
    )["metadata"]["name"]
    assert not mount.get("readOnly")
    deployment = manifest("Deployment")["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"]["type"] == "Recreate"


def test_writable_tmp_exists_despite_the_read_only_root() -> None:
    _, volume = mount_for("/tmp/x")
    assert "emptyDir" in volume


def test_config_comes_from_the_configmap_and_is_a_valid_exporter_config(tmp_path: Path) -> None:
    from exporter.config import parse_config

    config_path = arg("--config.file")
    _, volume = mount_for(config_path)
    configmap = manifest("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    document = yaml.safe_load(configmap["data"][Path(config_path).name])
    for app in document["apps"]:
        secret_path = app["server_secret_file"]
        _, secret_volume = mount_for(secret_path)
        secret = manifest("Secret")
        assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert Path(secret_path).name in secret["stringData"]
        (tmp_path / "secret").write_text("0123456789abcdef0123456789abcdef")
        app["server_secret_file"] = str(tmp_path / "secret")
    parse_config(yaml.safe_dump(document), config_path, tmp_path)


def test_service_name_gives_the_job_label_the_rules_expect() -> None:
    service = manifest("Service")
    assert service["metadata"]["name"] == "zego-cloudrecord"
    pod_labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def test_service_monitor_scrapes_the_service_every_15s() -> None:
    monitor = manifest("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = manifest("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"
    ].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert "jobLabel" not in monitor["spec"], "the job label must stay the Service name"


def test_prometheus_rule_groups_equal_rules_yml() -> None:
    rule = manifest("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]


def test_prometheus_rule_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("gen", BASE / "gen_prometheusrule.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert (BASE / "prometheusrule.yaml").read_text() == generator.render(), (
        "deploy/kubernetes/prometheusrule.yaml is stale: run "
        "python deploy/kubernetes/gen_prometheusrule.py"
    )


def test_every_resource_carries_the_app_name_label() -> None:
    for document in manifests():
        labels = document["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "zego-cloudrecord-exporter", document["kind"]
