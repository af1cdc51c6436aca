"""Shared helpers of the Kubernetes tests: specs, launch requests, settings (imported by name, so it
cannot clash with another folder's conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.launchers.k8s.settings import KubernetesSettings, Toleration
from service.launchers.base import LaunchRequest
from trainer.core.spec import spec_from_obj

REPO = Path(__file__).resolve().parents[2]
KUBE_VERSIONS = ("1.30.0", "1.33.0", "1.35.0")  # oldest and newest supported minors, and one between
JOB_ID = "j-20261123t101500-ab12cd34"
SPEC_URI = f"s3://lathe-state/tenants/acme/jobs/{JOB_ID}/spec.json"


def make_request(resources: dict[str, Any] | None = None, *, attempt: int = 1, job_id: str = JOB_ID,
                 tenant: str = "acme", env: dict[str, str] | None = None,
                 precision: dict[str, Any] | None = None) -> LaunchRequest:
    spec = spec_from_obj({
        "version": 1,
        "model": {"uri": "s3://models/sd15"},
        "dataset": {"uri": "s3://datasets/cats"},
        "resources": resources or {},
        "precision": precision or {},
    })
    return LaunchRequest(job_id=job_id, tenant=tenant, attempt=attempt, spec_uri=SPEC_URI, spec=spec, env=env or {})


def full_settings(**overrides: Any) -> KubernetesSettings:
    """Settings with every optional knob set, like a production GPU pool."""
    values: dict[str, Any] = dict(
        namespace="lathe",
        trainer_image="registry.example.com/lathe/trainer:0.1.0",
        image_pull_secrets=("regcred",),
        node_selector={"lathe.dev/pool": "gpu"},
        tolerations=(Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),),
        priority_class="lathe-training",
        model_cache="/var/cache/lathe/models",
        s3_secret_name="lathe-s3",
        s3_endpoint="http://minio.storage:9000",
        state_root="s3://lathe-state",
        service_account="lathe-trainer",
        termination_grace_s=600,
        default_max_runtime_s=86_400,
    )
    values.update(overrides)
    return KubernetesSettings(**values)


S3_SECRET = {"lathe-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}}


def gpu_node(api: Any, runtime: Any, **overrides: Any) -> Any:
    """A kubelet for one GPU node that fits `full_settings()` (pool label, GPU taint, the S3 Secret)."""
    from kubelet import Kubelet

    values: dict[str, Any] = dict(labels={"lathe.dev/pool": "gpu"}, capacity={"nvidia.com/gpu": 8},
                                  taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}], secrets=S3_SECRET)
    values.update(overrides)
    return Kubelet(api, runtime, **values)
