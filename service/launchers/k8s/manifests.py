"""Pure builders: (LaunchRequest, KubernetesSettings) → the batch/v1 Job and headless Service of one attempt.

No I/O here, so a whole object can be checked against the official schemas and compared in tests.
Shapes:
- one Job per attempt, named `<job_id>-a<attempt>`, non-root, read-only root FS, no API token;
- 1 process: `python -m trainer run <spec_uri>`; several GPUs or nodes: `accelerate launch`, one
  process per GPU;
- nodes > 1: an Indexed Job (index = machine rank) and a headless Service giving rank 0 a stable DNS
  name;
- every shape: backoffLimit 0 and a podFailurePolicy that fails the Job on the trainer's final exit
  codes and on disruptions. The service alone retries (attempt n+1, resuming from the newest
  checkpoint, after attempt n's Job is gone): a Job that replaced its own pods would run a second
  trainer beside the service's next attempt, and a lone restarted rank would hang the others.
  FailJob rules also leave the pod and exit code in the Job's condition message, which outlives pods.
"""

from __future__ import annotations

import hashlib
import math
import re

from kubernetes import client as k8s

from service.launchers.k8s.settings import KubernetesSettings
from service.launchers.base import LaunchRequest
from trainer.core.failures import FINAL_EXIT_CODES

CONTAINER = "trainer"
LABEL_TENANT = "lathe.dev/tenant"
LABEL_JOB = "lathe.dev/job"
LABEL_ATTEMPT = "lathe.dev/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_JOB_ID = "lathe.dev/job-id"  # the full id, in case the label had to be shortened
ANNOTATION_SPEC_URI = "lathe.dev/spec-uri"
# Set by the Job controller on every pod of an Indexed Job (Kubernetes ≥ 1.22).
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

CACHE_DIR = "/cache/models"
SCRATCH_DIR = "/scratch"
# Names ≤ 63 (DNS label) leaving room for the "-<index>" that an Indexed Job appends to form each
# pod's hostname (nodes ≤ 64 in the spec ⇒ at most "-63"; 4 characters keep a margin).
NAME_MAX = 63 - 4
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# ---------------------------------------------------------------------------------------------
# Names and labels


def attempt_name(job_id: str, attempt: int) -> str:
    """`<job_id>-a<attempt>`, shortened with a hash of the id when too long; a valid DNS-1035 label."""
    if not _DNS_LABEL.match(job_id):
        raise ValueError(f"job_id {job_id!r}: must be lowercase letters, digits and '-' (DNS-safe)")
    if attempt < 1:
        raise ValueError(f"attempt {attempt}: attempts count from 1")
    base = job_id if job_id[0].isalpha() else f"lathe-{job_id}"  # Services need a leading letter
    suffix = f"-a{attempt}"
    if len(base) + len(suffix) <= NAME_MAX:
        return base + suffix
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
    keep = NAME_MAX - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def label_value(value: str) -> str:
    """A label value (≤ 63 characters); longer values keep a prefix and a hash, so they stay unique."""
    if len(value) <= 63:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[:52].rstrip('-_.')}-{digest}"


def attempt_labels(tenant: str, job_id: str, attempt: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "lathe",
        LABEL_COMPONENT: "trainer",
        "app.kubernetes.io/managed-by": "lathe",
        LABEL_TENANT: label_value(tenant),
        LABEL_JOB: label_value(job_id),
        LABEL_ATTEMPT: str(attempt),
    }


def attempt_selector(tenant: str, job_id: str, attempt: int) -> str:
    """Label selector matching the pods (and Service) of one attempt."""
    labels = attempt_labels(tenant, job_id, attempt)
    return ",".join(f"{k}={labels[k]}" for k in (LABEL_TENANT, LABEL_JOB, LABEL_ATTEMPT))


def rank0_host(name: str, namespace: str) -> str:
    """Stable DNS name of rank 0: Indexed pods get hostname `<job>-<index>`, the Service is the subdomain."""
    return f"{name}-0.{name}.{namespace}.svc"


# ---------------------------------------------------------------------------------------------
# Trainer command


def uses_accelerate(gpus: int, nodes: int) -> bool:
    return nodes > 1 or gpus > 1


def trainer_command(request: LaunchRequest, settings: KubernetesSettings) -> list[str]:
    """The container command. Multi-node ranks come from `$(LATHE_MACHINE_RANK)`, which the kubelet
    expands from the pod's completion-index annotation (env var set through the downward API)."""
    res = request.spec.resources
    run = ["trainer", "run", request.spec_uri]
    if not uses_accelerate(res.gpus, res.nodes):
        return ["python", "-m", *run]
    command = [
        # accelerate launch exits 1 whatever the trainer's code: `trainer launch` passes the code on.
        "python", "-m", "trainer", "launch", "--",
        "accelerate", "launch",
        "--multi_gpu",
        "--num_processes", str(res.gpus * res.nodes),
        "--num_machines", str(res.nodes),
    ]
    if res.nodes > 1:
        name = attempt_name(request.job_id, request.attempt)
        command += [
            "--machine_rank", "$(LATHE_MACHINE_RANK)",
            "--main_process_ip", rank0_host(name, settings.namespace),
        ]
    else:
        command += ["--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
    command += [
        "--main_process_port", str(settings.rendezvous_port),
        # Said explicitly so accelerate neither guesses nor warns; the trainer's Accelerator agrees.
        "--mixed_precision", request.spec.precision.mixed_precision,
        "--dynamo_backend", "no",
        "-m", *run,
    ]
    return command


def _cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def omp_threads(request: LaunchRequest, settings: KubernetesSettings) -> int:
    """Threads per process: the pod's CPUs shared among its processes, else the settings' default."""
    res = request.spec.resources
    if res.cpu is None:
        return settings.omp_num_threads
    return max(1, math.floor(_cpu_cores(res.cpu) / max(1, res.gpus)))


def trainer_env(request: LaunchRequest, settings: KubernetesSettings) -> list[k8s.V1EnvVar]:
    """Environment of the trainer container. Lathe's own variables win over extra env of the same name."""
    res = request.spec.resources
    values: dict[str, str] = {**settings.extra_env, **request.env}
    values.update({
        "LATHE_JOB_ID": request.job_id,
        "LATHE_TENANT": request.tenant,
        "LATHE_JOB_ATTEMPT": str(request.attempt),
        "LATHE_CACHE_DIR": CACHE_DIR,
        "HOME": SCRATCH_DIR,  # the root filesystem is read-only: everything writable lives on scratch
        "TMPDIR": SCRATCH_DIR,
        "LATHE_WORK_DIR": f"{SCRATCH_DIR}/work",  # the trainer's local job folder (caches, logs)
        "XDG_CACHE_HOME": f"{SCRATCH_DIR}/.cache",
        "MPLCONFIGDIR": f"{SCRATCH_DIR}/.config/matplotlib",
        "PYTHONUNBUFFERED": "1",  # log lines reach `kubectl logs` as they are written
        "OMP_NUM_THREADS": str(omp_threads(request, settings)),
    })
    if settings.s3_endpoint:
        values["AWS_ENDPOINT_URL"] = settings.s3_endpoint
    if settings.state_root:
        values["LATHE_STATE_ROOT"] = settings.state_root
    if res.nodes > 1:
        values["LATHE_NUM_MACHINES"] = str(res.nodes)
    if uses_accelerate(res.gpus, res.nodes):
        # torchrun SIGKILLs its workers this long after it got SIGTERM (30 s by default): leave them the
        # pod's grace period, less a margin for torchrun's own exit, to write their checkpoint.
        values["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(1, settings.termination_grace_s - 15))
    env = [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(values.items())]
    if res.nodes > 1:
        env.append(k8s.V1EnvVar(
            name="LATHE_MACHINE_RANK",
            value_from=k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(
                field_path=f"metadata.annotations['{ANNOTATION_COMPLETION_INDEX}']"
            )),
        ))
    if settings.s3_secret_name:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True), ("AWS_REGION", True),
        ):
            env.append(k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=settings.s3_secret_name, key=key, optional=optional)
            )))
    return env


# ---------------------------------------------------------------------------------------------
# Pod, Job, Service


def _resources(request: LaunchRequest, settings: KubernetesSettings) -> k8s.V1ResourceRequirements:
    res = request.spec.resources
    memory = res.memory or settings.default_memory
    requests = {
        "cpu": res.cpu or settings.default_cpu,
        "memory": memory,
        "ephemeral-storage": settings.scratch_size,  # scratch is an on-disk emptyDir
    }
    limits = {"memory": memory}  # no CPU limit: throttling a data loader only slows the GPUs
    if res.gpus > 0:
        requests[settings.gpu_resource_name] = str(res.gpus)
        limits[settings.gpu_resource_name] = str(res.gpus)  # extended resources: requests = limits
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _volumes(request: LaunchRequest, settings: KubernetesSettings) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    # /dev/shm: the runtime's default 64 MiB breaks DataLoader workers and NCCL; counts toward memory.
    volumes = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=request.spec.resources.shm_size)),
        k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=settings.scratch_size)),
    ]
    if settings.model_cache is None:
        cache = k8s.V1Volume(name="model-cache", empty_dir=k8s.V1EmptyDirVolumeSource())
    elif settings.model_cache_is_host_path:
        cache = k8s.V1Volume(name="model-cache", host_path=k8s.V1HostPathVolumeSource(
            path=settings.model_cache, type="DirectoryOrCreate"))
    else:
        cache = k8s.V1Volume(name="model-cache", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=settings.model_cache))
    volumes.append(cache)
    mounts = [
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH_DIR),
        k8s.V1VolumeMount(name="model-cache", mount_path=CACHE_DIR),
    ]
    return volumes, mounts


def _node_selector(request: LaunchRequest, settings: KubernetesSettings) -> dict[str, str] | None:
    selector = dict(settings.node_selector)
    if request.spec.resources.gpu_type:
        selector[settings.gpu_type_label] = request.spec.resources.gpu_type
    return selector or None


def build_pod_template(request: LaunchRequest, settings: KubernetesSettings) -> k8s.V1PodTemplateSpec:
    name = attempt_name(request.job_id, request.attempt)
    multi_node = request.spec.resources.nodes > 1
    volumes, mounts = _volumes(request, settings)
    container = k8s.V1Container(
        name=CONTAINER,
        image=settings.trainer_image,
        image_pull_policy=settings.image_pull_policy,
        command=trainer_command(request, settings),
        env=trainer_env(request, settings),
        resources=_resources(request, settings),
        volume_mounts=mounts,
        ports=[k8s.V1ContainerPort(name="rendezvous", container_port=settings.rendezvous_port)] if multi_node else None,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            run_as_non_root=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        termination_message_policy="FallbackToLogsOnError",  # the last log lines explain a crash
    )
    spec = k8s.V1PodSpec(
        restart_policy="Never",  # required by podFailurePolicy; retries are Job- or service-level
        containers=[container],
        volumes=volumes,
        automount_service_account_token=False,
        service_account_name=settings.service_account,
        enable_service_links=False,
        termination_grace_period_seconds=settings.termination_grace_s,
        node_selector=_node_selector(request, settings),
        tolerations=[
            k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                             toleration_seconds=t.tolerationSeconds)
            for t in settings.tolerations
        ] or None,
        priority_class_name=settings.priority_class,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in settings.image_pull_secrets] or None,
        subdomain=name if multi_node else None,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=settings.run_as_user,
            run_as_group=settings.run_as_group,
            fs_group=settings.fs_group,
            fs_group_change_policy="OnRootMismatch",  # a big cache PVC is not re-chowned every start
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(
            labels=attempt_labels(request.tenant, request.job_id, request.attempt),
            annotations={"kubectl.kubernetes.io/default-container": CONTAINER},
        ),
        spec=spec,
    )


def _pod_failure_policy() -> k8s.V1PodFailurePolicy:
    # First match wins: a final exit code fails the Job even if the pod was also being disrupted.
    # A disruption also fails it (not Ignore): the service starts the next attempt, not the Job.
    return k8s.V1PodFailurePolicy(rules=[
        k8s.V1PodFailurePolicyRule(
            action="FailJob",
            on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
                container_name=CONTAINER, operator="In", values=list(FINAL_EXIT_CODES)),
        ),
        k8s.V1PodFailurePolicyRule(
            action="FailJob",  # preemption, eviction, node drain: the service retries
            on_pod_conditions=[k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")],
        ),
    ])


def build_job(request: LaunchRequest, settings: KubernetesSettings) -> k8s.V1Job:
    """The batch/v1 Job of one attempt."""
    res = request.spec.resources
    name = attempt_name(request.job_id, request.attempt)
    labels = attempt_labels(request.tenant, request.job_id, request.attempt)
    if settings.kueue_queue:
        labels[LABEL_KUEUE_QUEUE] = settings.kueue_queue
    multi_node = res.nodes > 1
    deadline = res.max_runtime_s if res.max_runtime_s is not None else settings.default_max_runtime_s
    spec = k8s.V1JobSpec(
        template=build_pod_template(request, settings),
        completions=res.nodes,
        parallelism=res.nodes,
        completion_mode="Indexed" if multi_node else "NonIndexed",
        backoff_limit=0,  # one owner of retries: the service
        pod_failure_policy=_pod_failure_policy(),
        active_deadline_seconds=deadline,
        ttl_seconds_after_finished=settings.ttl_seconds_after_finished,
        suspend=True if settings.kueue_queue else None,  # Kueue admits (unsuspends) it when quota allows
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=settings.namespace,
            labels=labels,
            annotations={ANNOTATION_JOB_ID: request.job_id, ANNOTATION_SPEC_URI: request.spec_uri},
        ),
        spec=spec,
    )


def build_headless_service(
    request: LaunchRequest, settings: KubernetesSettings, owner: k8s.V1OwnerReference | None = None
) -> k8s.V1Service:
    """Headless Service that gives each pod of a multi-node attempt a DNS name (rank 0 is the rendezvous).

    `owner` (the Job) lets the garbage collector delete the Service with the Job, TTL included.
    """
    name = attempt_name(request.job_id, request.attempt)
    labels = attempt_labels(request.tenant, request.job_id, request.attempt)
    selector = {k: labels[k] for k in (LABEL_TENANT, LABEL_JOB, LABEL_ATTEMPT)}
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(
            name=name, namespace=settings.namespace, labels=labels,
            owner_references=[owner] if owner else None,
        ),
        spec=k8s.V1ServiceSpec(
            cluster_ip="None",
            selector=selector,
            # Ranks look rank 0 up while it starts, before any readiness: publish addresses at once.
            publish_not_ready_addresses=True,
            ports=[k8s.V1ServicePort(name="rendezvous", port=settings.rendezvous_port,
                                     target_port=settings.rendezvous_port, protocol="TCP")],
        ),
    )


def owner_reference(job: k8s.V1Job) -> k8s.V1OwnerReference:
    return k8s.V1OwnerReference(api_version="batch/v1", kind="Job", name=job.metadata.name, uid=job.metadata.uid)


def build_manifests(request: LaunchRequest, settings: KubernetesSettings) -> list[object]:
    """Everything one attempt creates, in creation order (the Service only for nodes > 1)."""
    job = build_job(request, settings)
    if request.spec.resources.nodes > 1:
        return [job, build_headless_service(request, settings)]
    return [job]
