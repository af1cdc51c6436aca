"""Settings of the Kubernetes launcher: where and how trainer Jobs run.

One field per knob, each documented here; `from_env` reads them from `LATHE_K8S_<FIELD>` variables
(the Helm chart's ConfigMap sets them). Scalars are plain strings (`LATHE_K8S_NAMESPACE=lathe`),
numbers are decimal, lists and maps are JSON (`LATHE_K8S_NODE_SELECTOR={"pool":"gpu"}`); a list of
names may also be comma-separated (`LATHE_K8S_IMAGE_PULL_SECRETS=regcred,other`). An empty variable
means "not set" (the default applies), so a chart can always render every key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from trainer.core.msgspec_errors import split_validation_error

ENV_PREFIX = "LATHE_K8S_"

DnsLabel = Annotated[str, Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
DnsSubdomain = Annotated[
    str, Meta(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
]
Quantity = Annotated[str, Meta(max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$")]
# A resource name such as nvidia.com/gpu or amd.com/gpu (prefix/name).
ResourceName = Annotated[str, Meta(max_length=253, pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")]
LabelKey = Annotated[str, Meta(max_length=316, pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")]
EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Seconds = Annotated[int, Meta(ge=0)]
UnixId = Annotated[int, Meta(ge=1, le=2**31 - 1)]  # ≥ 1: the trainer never runs as root


class Toleration(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A pod toleration, with the field names Kubernetes uses (`{"key": "nvidia.com/gpu", "operator": "Exists"}`)."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None  # noqa: N815 (Kubernetes' spelling)


class KubernetesSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Where the trainer Jobs (and the multi-node headless Services) are created. The chart sets the
    # release namespace: the service's Role only grants access there.
    namespace: DnsLabel = "lathe"
    # The trainer image (Dockerfile target `trainer`), pinned by tag or digest.
    trainer_image: Annotated[str, Meta(min_length=1, max_length=512)] = "lathe-trainer:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # Secrets of type kubernetes.io/dockerconfigjson in `namespace`, for a private registry.
    image_pull_secrets: tuple[DnsSubdomain, ...] = ()
    # Node labels every trainer pod must match (e.g. the GPU node pool's label).
    node_selector: dict[LabelKey, str] = {}
    # Taints of the GPU nodes the trainer pods tolerate.
    tolerations: tuple[Toleration, ...] = ()
    # PriorityClass of trainer pods (lets the cluster preempt them for more important work, or not).
    priority_class: DnsSubdomain | None = None
    # The extended resource a GPU is requested as (requests = limits).
    gpu_resource_name: ResourceName = "nvidia.com/gpu"
    # The node label that a spec's `resources.gpu_type` is matched against (GPU feature discovery's).
    gpu_type_label: LabelKey = "nvidia.com/gpu.product"
    # Model cache mounted at LATHE_CACHE_DIR: an absolute path is a hostPath on the node (node-local,
    # survives pods; fsGroup does not chown hostPath, so the directory must be group-writable by
    # `fs_group` — see docs/deploy.md), any other value is the name of a PersistentVolumeClaim
    # (ReadWriteMany for multi-node). None: an emptyDir, so every pod downloads its model again.
    model_cache: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    # Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN,
    # AWS_REGION) for the trainer. None: credentials come from elsewhere (e.g. workload identity).
    s3_secret_name: DnsSubdomain | None = None
    # Endpoint of a non-AWS object store (MinIO, Ceph…), given to the trainer as AWS_ENDPOINT_URL.
    s3_endpoint: Annotated[str, Meta(max_length=2048)] | None = None
    # The deployment's state root URI (s3://bucket/prefix), given to the trainer as LATHE_STATE_ROOT
    # for tooling in the pod; the trainer itself finds its job directory from the spec URI.
    state_root: Annotated[str, Meta(max_length=2048)] | None = None
    # ServiceAccount of trainer pods (for workload identity); its API token is never mounted.
    service_account: DnsSubdomain | None = None
    # Kueue LocalQueue: when set, Jobs carry `kueue.x-k8s.io/queue-name` and are created suspended.
    kueue_queue: DnsSubdomain | None = None
    # Finished Jobs (and their pods and logs) are deleted this long after they end.
    ttl_seconds_after_finished: Seconds = 86_400
    # SIGTERM → SIGKILL delay: long enough for the trainer to write its checkpoint and exit.
    termination_grace_s: Annotated[int, Meta(ge=30, le=3600)] = 300
    # Applied when a spec sets no `resources.max_runtime_s` (None: no deadline).
    default_max_runtime_s: Annotated[int, Meta(ge=60)] | None = None
    # An admitted attempt (Job started, i.e. unsuspended) whose pods are not all running this long
    # after fails as `unschedulable` and is deleted (its pods may hold GPUs or quota). Covers pods no
    # node fits and pods that admission refused to create. None: wait forever.
    start_timeout_s: Annotated[int, Meta(ge=60)] | None = 3600
    # An image pull that keeps failing this long after the pod was created fails the attempt.
    image_pull_timeout_s: Annotated[int, Meta(ge=30)] = 600
    run_as_user: UnixId = 1000
    run_as_group: UnixId = 1000
    fs_group: UnixId = 1000
    # Size of the writable scratch emptyDir (HOME, TMPDIR, caches: the root filesystem is read-only).
    scratch_size: Quantity = "50Gi"
    # CPU / memory per pod when the spec does not say (memory limit = request; no CPU limit).
    default_cpu: Quantity = "8"
    default_memory: Quantity = "32Gi"
    # OMP_NUM_THREADS per trainer process when the spec gives no CPU count to derive it from.
    omp_num_threads: Annotated[int, Meta(ge=1, le=256)] = 4
    # TCP port of the torch.distributed rendezvous on rank 0 (multi-GPU and multi-node).
    rendezvous_port: Annotated[int, Meta(ge=1024, le=65535)] = 29500
    # Extra environment for every trainer container (LATHE_* overrides, NCCL_* tuning…).
    extra_env: dict[EnvName, str] = {}

    def __post_init__(self) -> None:
        if self.model_cache is not None and not self.model_cache.startswith("/"):
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", self.model_cache) or len(self.model_cache) > 253:
                # msgspec turns this into a ValidationError; the "field:" prefix names the setting.
                raise ValueError(
                    f"model_cache: {self.model_cache!r} is neither an absolute hostPath nor a valid "
                    "PersistentVolumeClaim name; give an absolute node path such as /var/cache/lathe "
                    "or a lowercase PVC name"
                )

    @property
    def model_cache_is_host_path(self) -> bool:
        return self.model_cache is not None and self.model_cache.startswith("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> KubernetesSettings:
        """Settings from `LATHE_K8S_*` variables; unknown `LATHE_K8S_*` names are an error (typos)."""
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        values: dict[str, Any] = {}
        for var, raw in environ.items():
            if not var.startswith(ENV_PREFIX):
                continue
            name = var[len(ENV_PREFIX):].lower()
            if name not in fields:
                known = ", ".join(ENV_PREFIX + n.upper() for n in fields)
                raise SettingsError(var, f"unknown setting; known variables: {known}")
            if raw.strip() == "":
                continue
            values[name] = _parse_env_value(var, raw, fields[name].type)
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(_env_name_of(str(exc)), str(exc)) from None


class SettingsError(ValueError):
    """A setting with a bad value; names the variable/field and what is expected."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def _parse_env_value(var: str, raw: str, annotation: Any) -> Any:
    """Strings stay strings; everything else is JSON (a list of names may be comma-separated)."""
    kind = _kind_of(annotation)
    if kind == "str":
        return raw
    if kind == "names" and raw.lstrip()[:1] != "[":
        return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        example = {"map": '{"key": "value"}', "names": '["a", "b"] or a,b', "list": '[{"key": "k"}]'}.get(kind, "a number")
        raise SettingsError(var, f"not valid JSON ({exc.msg}); expected e.g. {example}") from None


def _kind_of(annotation: Any) -> str:
    """'str', 'names' (tuple of str), 'list', 'map' or 'number' for a settings field's type."""
    base = _unwrap(annotation)
    origin = get_origin(base)
    if base is str or (origin is Literal and all(isinstance(a, str) for a in get_args(base))):
        return "str"
    if origin is dict:
        return "map"
    if origin is tuple:
        return "names" if _unwrap(get_args(base)[0]) is str else "list"
    return "number"


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `| None`."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType):
            non_none = [a for a in get_args(annotation) if a is not type(None)]
            annotation = non_none[0]
        else:
            return annotation


def _env_name_of(message: str) -> str:
    m = re.match(r"([A-Za-z_]+)", split_validation_error(message)[0]) or re.match(r"([a-z_]+): ", message)
    return ENV_PREFIX + m.group(1).upper() if m else "LATHE_K8S_*"
