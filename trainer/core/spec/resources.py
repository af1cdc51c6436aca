"""The `resources` and `logging` sections: what a run is given, and what it reports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.spec.common import PositiveInt, _Base
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec


class ResourcesSpec(_Base):
    gpus: Annotated[int, Meta(ge=0, le=16)] = 1  # processes per node (0: CPU)
    nodes: Annotated[int, Meta(ge=1, le=64)] = 1
    cpu: Annotated[str, Meta(max_length=16, pattern=r"^[0-9]+(\.[0-9]+|m)?$")] | None = None
    memory: Annotated[str, Meta(max_length=16, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")] | None = None
    shm_size: Annotated[str, Meta(max_length=16, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")] = "16Gi"
    gpu_type: Annotated[str, Meta(max_length=63)] | None = None
    max_runtime_s: Annotated[int, Meta(ge=60)] | None = None
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3


class LoggingSpec(_Base):
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    log_prefix: Annotated[str, Meta(max_length=200)] | None = None
    log_every_n_steps: PositiveInt = 1
    debug: bool = False


_QUANTITY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    """A memory quantity of resources.memory / shm_size (digits and an optional unit) in bytes."""
    digits = quantity.rstrip("KMGTi")
    return int(digits) * _QUANTITY_UNITS[quantity[len(digits):]]


def check_resources(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, prec = out.err, out.warn, spec.precision
    if spec.resources.nodes > 1 and spec.resources.gpus < 1:
        err("resources.nodes", "multi-node training needs resources.gpus ≥ 1 per node")
    res = spec.resources
    if res.memory is not None and _bytes(res.shm_size) >= _bytes(res.memory):
        # /dev/shm is a memory-backed emptyDir: what it holds counts toward the pod's memory limit.
        err("resources.shm_size", f"{res.shm_size} is not below resources.memory ({res.memory}); shared memory "
            "counts toward the memory limit, so a full /dev/shm would OOM-kill the trainer: lower shm_size "
            "or raise memory")
    if prec.torch_compile is True and spec.resources.gpus < 1:
        warn("precision.torch_compile", "on CPU the first steps compile for many minutes (inductor builds C++), and "
             "again for each bucket shape; it is meant for GPUs (set resources.gpus, or turn it off)")
    return out
