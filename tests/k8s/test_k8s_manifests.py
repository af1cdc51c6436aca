"""The pure builders: names, labels, the whole Job/Service objects, and the official schemas."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
from k8s_helpers import JOB_ID, KUBE_VERSIONS, SPEC_URI, full_settings, make_request
from kubernetes.client import ApiClient

from service.launchers.k8s import manifests
from service.launchers.k8s.settings import KubernetesSettings
from trainer.core.failures import FINAL_EXIT_CODES

SERIALIZE = ApiClient().sanitize_for_serialization

SHAPES = {
    "1gpu": {"gpus": 1},
    "8gpu": {"gpus": 8, "cpu": "64", "memory": "480Gi", "shm_size": "64Gi", "gpu_type": "NVIDIA-H100-80GB-HBM3"},
    "4x8gpu": {"gpus": 8, "nodes": 4, "max_runtime_s": 172_800},
    "cpu": {"gpus": 0, "cpu": "4", "memory": "8Gi", "shm_size": "1Gi"},  # shm counts toward memory
}


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


@pytest.mark.parametrize("kueue", [None, "lathe-gpu"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_manifest_validates_against_official_schemas(shape: str, kueue: str | None) -> None:
    request = make_request(SHAPES[shape])
    for settings in (KubernetesSettings(kueue_queue=kueue), full_settings(kueue_queue=kueue)):
        objects = [SERIALIZE(o) for o in manifests.build_manifests(request, settings)]
        assert [o["kind"] for o in objects] == (["Job", "Service"] if shape == "4x8gpu" else ["Job"])
        for obj in objects:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)


def test_single_gpu_job_as_a_whole() -> None:
    job = SERIALIZE(manifests.build_job(make_request({"gpus": 1, "max_runtime_s": 3600}), full_settings()))
    name = f"{JOB_ID}-a1"
    assert job["metadata"]["name"] == name
    assert job["metadata"]["namespace"] == "lathe"
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/name": "lathe", "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "lathe",
        "lathe.dev/tenant": "acme", "lathe.dev/job": JOB_ID, "lathe.dev/attempt": "1",
    }
    assert job["metadata"]["annotations"] == {"lathe.dev/job-id": JOB_ID, "lathe.dev/spec-uri": SPEC_URI}
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 1
    assert spec["completionMode"] == "NonIndexed"
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 3600  # the spec's max runtime wins over the settings' default
    assert spec["ttlSecondsAfterFinished"] == 86_400
    assert "suspend" not in spec
    assert spec["podFailurePolicy"] == {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": list(FINAL_EXIT_CODES)}},
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}
    pod = _pod(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "lathe-trainer"
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] == 600
    assert pod["priorityClassName"] == "lathe-training"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"lathe.dev/pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "subdomain" not in pod
    assert pod["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "50Gi"}},
        {"name": "model-cache", "hostPath": {"path": "/var/cache/lathe/models", "type": "DirectoryOrCreate"}},
    ]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/lathe/trainer:0.1.0"
    assert container["command"] == ["python", "-m", "trainer", "run", SPEC_URI]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
    }
    assert container["volumeMounts"] == [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/scratch"},
        {"name": "model-cache", "mountPath": "/cache/models"},
    ]


def test_trainer_environment() -> None:
    request = make_request({"gpus": 2, "cpu": "16"}, attempt=3,
                           env={"LATHE_LOG_LEVEL": "debug", "LATHE_JOB_ATTEMPT": "99"})
    settings = full_settings(extra_env={"NCCL_DEBUG": "WARN", "HOME": "/root"})
    env = _pod(SERIALIZE(manifests.build_job(request, settings)))["containers"][0]["env"]
    plain = {e["name"]: e["value"] for e in env if "value" in e}
    assert plain == {
        "AWS_ENDPOINT_URL": "http://minio.storage:9000",
        "HOME": "/scratch",  # Lathe's own values win over extra env
        "LATHE_CACHE_DIR": "/cache/models",
        "LATHE_JOB_ATTEMPT": "3",
        "LATHE_JOB_ID": JOB_ID,
        "LATHE_LOG_LEVEL": "debug",
        "LATHE_STATE_ROOT": "s3://lathe-state",
        "LATHE_TENANT": "acme",
        "LATHE_WORK_DIR": "/scratch/work",
        "MPLCONFIGDIR": "/scratch/.config/matplotlib",
        "NCCL_DEBUG": "WARN",
        "OMP_NUM_THREADS": "8",  # 16 CPUs shared by 2 processes
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "585",  # torchrun's SIGTERM → SIGKILL: the grace period (600) less 15 s
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": "/scratch",
        "XDG_CACHE_HOME": "/scratch/.cache",
    }
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert secret_refs == {
        "AWS_ACCESS_KEY_ID": {"name": "lathe-s3", "key": "AWS_ACCESS_KEY_ID", "optional": False},
        "AWS_SECRET_ACCESS_KEY": {"name": "lathe-s3", "key": "AWS_SECRET_ACCESS_KEY", "optional": False},
        "AWS_SESSION_TOKEN": {"name": "lathe-s3", "key": "AWS_SESSION_TOKEN", "optional": True},
        "AWS_REGION": {"name": "lathe-s3", "key": "AWS_REGION", "optional": True},
    }


def test_minimal_settings_have_no_credentials_or_placement() -> None:
    pod = _pod(SERIALIZE(manifests.build_job(make_request(), KubernetesSettings())))
    env_names = {e["name"] for e in pod["containers"][0]["env"]}
    assert not env_names & {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "LATHE_STATE_ROOT"}
    assert pod["containers"][0]["env"][0]["name"] == "HOME"  # sorted, deterministic
    for key in ("nodeSelector", "tolerations", "imagePullSecrets", "priorityClassName", "serviceAccountName"):
        assert key not in pod
    assert pod["volumes"][2] == {"name": "model-cache", "emptyDir": {}}


def test_model_cache_pvc_and_gpu_type_selector() -> None:
    request = make_request({"gpus": 8, "gpu_type": "NVIDIA-A100-SXM4-80GB"})
    pod = _pod(SERIALIZE(manifests.build_job(request, full_settings(model_cache="lathe-model-cache"))))
    assert pod["volumes"][2] == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "lathe-model-cache"}}
    assert pod["nodeSelector"] == {"lathe.dev/pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_eight_gpus_one_node_uses_accelerate_without_rendezvous_service() -> None:
    request = make_request(SHAPES["8gpu"])
    settings = full_settings(gpu_resource_name="amd.com/gpu")
    objects = manifests.build_manifests(request, settings)
    assert len(objects) == 1
    container = _pod(SERIALIZE(objects[0]))["containers"][0]
    assert container["command"] == [
        "python", "-m", "trainer", "launch", "--",
        "accelerate", "launch", "--multi_gpu", "--num_processes", "8", "--num_machines", "1",
        "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", "29500",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", "run", SPEC_URI,
    ]
    assert container["resources"]["limits"] == {"memory": "480Gi", "amd.com/gpu": "8"}
    assert container["resources"]["requests"]["amd.com/gpu"] == "8"
    assert _pod(SERIALIZE(objects[0]))["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_cpu_only_job_requests_no_gpu() -> None:
    container = _pod(SERIALIZE(manifests.build_job(make_request(SHAPES["cpu"]), full_settings())))["containers"][0]
    assert container["command"][:3] == ["python", "-m", "trainer"]
    assert container["resources"]["limits"] == {"memory": "8Gi"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]


def test_multi_node_job_is_indexed_with_headless_service() -> None:
    request = make_request(SHAPES["4x8gpu"])
    job, service = (SERIALIZE(o) for o in manifests.build_manifests(request, full_settings()))
    name = f"{JOB_ID}-a1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["backoffLimit"] == 0  # no per-index retry: a lone restarted rank hangs the others
    assert job["spec"]["podFailurePolicy"]["rules"][1]["action"] == "FailJob"  # disruptions end the attempt, too
    assert job["spec"]["activeDeadlineSeconds"] == 172_800
    pod = _pod(job)
    assert pod["subdomain"] == name
    assert pod["containers"][0]["ports"] == [{"name": "rendezvous", "containerPort": 29500}]
    rank_env = next(e for e in pod["containers"][0]["env"] if e["name"] == "LATHE_MACHINE_RANK")
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert service["metadata"]["name"] == name
    assert service["spec"] == {
        "clusterIP": "None",
        "publishNotReadyAddresses": True,
        "selector": {"lathe.dev/tenant": "acme", "lathe.dev/job": JOB_ID, "lathe.dev/attempt": "1"},
        "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}],
    }
    # The Service selects exactly the pods of this attempt.
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_kueue_queue_label_and_suspended() -> None:
    job = SERIALIZE(manifests.build_job(make_request(SHAPES["4x8gpu"]), full_settings(kueue_queue="lathe-gpu")))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lathe-gpu"
    assert job["spec"]["suspend"] is True


def test_attempt_names() -> None:
    assert manifests.attempt_name(JOB_ID, 1) == f"{JOB_ID}-a1"
    assert manifests.attempt_name(JOB_ID, 12) == f"{JOB_ID}-a12"
    long_id = "j-20261123t101500-" + "x" * 80
    names = {manifests.attempt_name(long_id, a) for a in (1, 2)} | {manifests.attempt_name(long_id + "y", 1)}
    assert len(names) == 3  # still unique per job and attempt
    for name in names:
        assert len(name) <= manifests.NAME_MAX
        assert len(f"{name}-63") <= 63  # room for the Indexed pods' hostnames
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert manifests.attempt_name(long_id, 2) == manifests.attempt_name(long_id, 2)  # deterministic
    assert manifests.attempt_name("42abc", 1) == "lathe-42abc-a1"  # Services need a leading letter
    with pytest.raises(ValueError, match="job_id 'J_1'"):
        manifests.attempt_name("J_1", 1)
    with pytest.raises(ValueError, match="attempts count from 1"):
        manifests.attempt_name(JOB_ID, 0)


def test_long_ids_give_valid_labels_and_objects() -> None:
    long_id = "j-20261123t101500-" + "x" * 80
    request = make_request(SHAPES["4x8gpu"], job_id=long_id)
    job, service = (SERIALIZE(o) for o in manifests.build_manifests(request, full_settings()))
    assert len(job["metadata"]["labels"]["lathe.dev/job"]) <= 63
    assert job["metadata"]["annotations"]["lathe.dev/job-id"] == long_id
    for obj in (job, service):
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    assert manifests.label_value("a" * 63) == "a" * 63
    assert manifests.label_value("a" * 64) != manifests.label_value("a" * 65)
