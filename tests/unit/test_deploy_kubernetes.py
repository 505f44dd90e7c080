"""deploy/kubernetes/ (SPEC §12), checked offline: every manifest against the Kubernetes API's
own schemas (``kubernetes-validate``, strict: an unknown field fails), the ServiceMonitor (a
CRD that package does not know) against a structural schema kept in ``tests/unit/schemas``, and
the wiring between them: the config in the ConfigMap is one ``serve`` accepts and fits the ports,
probes, secrets and volumes of the Deployment; selectors find the pods; the grace period covers
the drain.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxy import config as proxy_config
from proxy.identity import PepperError, parse_peppers

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
SERVICEMONITOR_SCHEMA = Path(__file__).parent / "schemas" / "servicemonitor-monitoring-v1.json"
# The oldest Kubernetes minor still supported upstream when this was written, and the newest the
# installed kubernetes-validate knows.
K8S_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
NOT_IN_KUBERNETES_SCHEMAS = {"Kustomization", "ServiceMonitor"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def manifests() -> dict[str, dict[str, Any]]:
    """Every object under deploy/kubernetes by kind (one object of each kind)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = doc | {"__file__": path.name}
    return out


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__file__"}


@pytest.fixture(scope="module")
def objs() -> dict[str, dict[str, Any]]:
    return manifests()


@pytest.fixture(scope="module")
def pod(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objs["Deployment"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["containers"]
    return dict(only)


@pytest.fixture(scope="module")
def proxy_yaml(objs: dict[str, dict[str, Any]]) -> str:
    text: str = objs["ConfigMap"]["data"]["proxy.yaml"]
    return text


def test_spec_12_lists_every_kind(objs: dict[str, dict[str, Any]]) -> None:
    wanted = {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "Kustomization",
    }
    assert set(objs) == wanted
    listed = set(objs["Kustomization"]["resources"])
    files = {doc["__file__"] for doc in objs.values()} - {"kustomization.yaml"}
    assert listed == files, "kustomization.yaml must list every manifest"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(
    objs: dict[str, dict[str, Any]], version: str
) -> None:
    checked = []
    for kind, doc in objs.items():
        if kind in NOT_IN_KUBERNETES_SCHEMAS:
            continue
        kubernetes_validate.validate(strip(doc), version, strict=True)
        checked.append(kind)
    assert len(checked) == 5


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readynessProbe={}),
        lambda d: d["spec"].update(replicas="two"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
    ],
    ids=["misspelt field", "wrong type", "required field missing"],
)
def test_kubernetes_validation_refuses_a_broken_deployment(
    objs: dict[str, dict[str, Any]], mutate: Any
) -> None:
    doc = copy.deepcopy(strip(objs["Deployment"]))
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_servicemonitor_against_its_structural_schema(objs: dict[str, dict[str, Any]]) -> None:
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    doc = strip(objs["ServiceMonitor"])
    validator.validate(doc)
    broken = copy.deepcopy(doc)
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(doc)
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not validator.is_valid(broken)


def test_configmap_holds_a_config_serve_accepts(proxy_yaml: str) -> None:
    cfg = proxy_config.parse(proxy_yaml, "deploy/kubernetes/configmap.yaml")
    assert cfg.redis.url != "embedded", "replicas must share one Redis"
    assert cfg.admin.listen.host in WILDCARD_HOSTS, "probes and Prometheus reach the admin port"


def test_config_mounted_as_a_directory_so_reload_follows_the_symlink_swap(
    objs: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    env = {e["name"]: e for e in container["env"]}
    config_path = PurePosixPath(env["ACCESS_PROXY_CONFIG"]["value"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[mount["name"]]["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert "subPath" not in mount, "a subPath mount is never updated"
    assert PurePosixPath(mount["mountPath"]) == config_path.parent
    assert config_path.name in objs["ConfigMap"]["data"]
    assert mount.get("readOnly") is True


def test_ports_and_probes_fit_the_config(proxy_yaml: str, container: dict[str, Any]) -> None:
    cfg = proxy_config.parse(proxy_yaml)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.listen.port, "admin": cfg.admin.listen.port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_termination_grace_covers_the_drain(
    proxy_yaml: str, pod: dict[str, Any], container: dict[str, Any]
) -> None:
    cfg = proxy_config.parse(proxy_yaml)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + cfg.shutdown_grace_s


def test_secrets_come_from_the_secret(
    objs: dict[str, dict[str, Any]], proxy_yaml: str, container: dict[str, Any]
) -> None:
    cfg = proxy_config.parse(proxy_yaml)
    secret = objs["Secret"]
    env = {e["name"]: e for e in container["env"]}
    upstream_keys = {u.api_key_env for u in cfg.upstreams.values() if u.api_key_env}
    wanted = {cfg.keys.pepper_env, "REDIS_URL", *upstream_keys}
    for name in wanted:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"], name
        assert ref["key"] in secret["stringData"], name
        assert "optional" not in ref, f"{name}: a missing secret must stop the pod"
    # The shipped pepper is a placeholder the proxy refuses: a forgotten edit cannot go live.
    pepper_key = env[cfg.keys.pepper_env]["valueFrom"]["secretKeyRef"]["key"]
    with pytest.raises(PepperError):
        parse_peppers(secret["stringData"][pepper_key])


def test_hardened_pod(
    objs: dict[str, dict[str, Any]], proxy_yaml: str, pod: dict[str, Any], container: dict[str, Any]
) -> None:
    cfg = proxy_config.parse(proxy_yaml)
    assert objs["Deployment"]["spec"]["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    # What must be writable under a read-only root: the state dir and /tmp (the metrics files
    # that --workers merges), each an emptyDir.
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {
        PurePosixPath(m["mountPath"])
        for m in container["volumeMounts"]
        if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
    }
    assert {PurePosixPath(cfg.state_dir), PurePosixPath("/tmp")} <= writable
    assert PurePosixPath(cfg.state_dir).is_absolute()


def test_selectors_find_the_pods(
    objs: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = objs["Service"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(objs["Deployment"]["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = objs["ServiceMonitor"]["spec"]
    assert selects(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    container_ports = {p["name"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} <= container_ports
    for endpoint in monitor["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert service_ports[endpoint["port"]]["targetPort"] == "admin"
    pdb = objs["PodDisruptionBudget"]["spec"]
    assert pdb.get("maxUnavailable", 0) < objs["Deployment"]["spec"]["replicas"]


# What the ConfigMap's config may differ in from config/proxy.yaml: what a cluster needs.
CLUSTER_ONLY = (
    ("admin", "listen"),
    ("redis", "url"),
    ("state_dir",),
    ("shutdown_grace_s",),
    ("upstreams", "models", "url"),
)


def _without(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    *parents, last = path
    for key in parents:
        doc = doc.get(key, {})
    doc.pop(last, None)


def test_configmap_is_the_shipped_config_but_for_the_cluster_settings(proxy_yaml: str) -> None:
    ours = yaml.safe_load(proxy_yaml)
    shipped = yaml.safe_load((REPO / "config" / "proxy.yaml").read_text())
    for path in CLUSTER_ONLY:
        _without(ours, path)
        _without(shipped, path)
    assert ours == shipped, (
        "update deploy/kubernetes/configmap.yaml with the change made to config/proxy.yaml"
    )
