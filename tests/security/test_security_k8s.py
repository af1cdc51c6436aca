"""The trainer Job's hardening, for every shape of job (tests/k8s checks the single-GPU Job field by
field): non-root with a RuntimeDefault seccomp profile, no privilege escalation, all capabilities
dropped, a read-only root filesystem, no host namespaces, no service-account token, and credentials
only through secretKeyRef, never as plain values in the manifest."""

from __future__ import annotations

from typing import Any

import pytest

from service.launchers.base import LaunchRequest
from trainer.core.spec import spec_from_obj

SHAPES = {
    "cpu": {"gpus": 0},
    "1gpu": {"gpus": 1},
    "8gpu": {"gpus": 8, "gpu_type": "NVIDIA-H100-80GB-HBM3"},
    "4x8gpu": {"gpus": 8, "nodes": 4},
}
HARDENED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}}


def _request(resources: dict[str, Any]) -> LaunchRequest:
    spec = spec_from_obj({"version": 1, "model": {"uri": "s3://m/x"}, "dataset": {"uri": "s3://d/x"},
                          "resources": resources})
    return LaunchRequest(job_id="j-20261123t101500-ab12cd34", tenant="acme", attempt=2,
                         spec_uri="s3://state/tenants/acme/jobs/j-20261123t101500-ab12cd34/spec.json", spec=spec,
                         env={"LATHE_LOG_LEVEL": "info"})


def _settings(kind: str) -> Any:
    from service.launchers.k8s.settings import KubernetesSettings

    if kind == "minimal":
        return KubernetesSettings()
    return KubernetesSettings(namespace="lathe", trainer_image="registry.example.com/lathe/trainer:1",
                              model_cache="/var/cache/lathe/models", s3_secret_name="lathe-s3",
                              s3_endpoint="http://minio:9000", state_root="s3://state", service_account="trainer",
                              run_as_user=2000, run_as_group=2000, fs_group=2000)


@pytest.mark.parametrize("settings_kind", ["minimal", "full"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_trainer_pod_is_hardened(shape, settings_kind):
    from kubernetes.client import ApiClient

    from service.launchers.k8s import manifests

    settings = _settings(settings_kind)
    job = ApiClient().sanitize_for_serialization(manifests.build_job(_request(SHAPES[shape]), settings))
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    for key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "hostUsers"):
        assert not pod.get(key), key
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["runAsUser"] >= 1 and context["runAsGroup"] >= 1
    containers = pod["containers"] + pod.get("initContainers", [])
    assert containers
    for container in containers:
        assert container["securityContext"] == HARDENED_CONTAINER, container["securityContext"]
        assert not container.get("ports") or shape == "4x8gpu"  # only the rendezvous port, multi-node
        for env in container["env"]:
            if env["name"] in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "lathe-s3", env
            assert not any(word in env["name"] for word in ("WEBHOOK_SECRET", "LATHE_TOKEN")), env
    for volume in pod["volumes"]:
        kinds = set(volume) - {"name"}
        assert kinds <= {"emptyDir", "hostPath", "persistentVolumeClaim"}, volume
        if "hostPath" in volume:  # only the model cache, never the node's root or its sockets
            assert volume["name"] == "model-cache" and volume["hostPath"]["path"] == "/var/cache/lathe/models"


def test_the_trainer_can_never_be_configured_to_run_as_root():
    import msgspec

    from service.launchers.k8s.settings import KubernetesSettings

    for field in ("run_as_user", "run_as_group", "fs_group"):
        with pytest.raises((msgspec.ValidationError, ValueError)):
            msgspec.convert({field: 0}, KubernetesSettings)
