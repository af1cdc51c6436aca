"""The Launcher protocol: how the service starts, watches and stops one attempt of a job.

Launchers are interchangeable: the local one runs `python -m trainer run` as a
subprocess, the Kubernetes one creates a batch/v1 Job. Nothing else in the service knows which runs.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import msgspec

from trainer.core.spec import JobSpec


class RunState(str, enum.Enum):
    PENDING = "pending"      # accepted by the launcher, not running yet (queue, scheduling, image pull)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    GONE = "gone"            # the launcher knows nothing of this attempt (deleted, TTL'd, never created)


class LaunchRequest(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    tenant: str
    attempt: int
    spec_uri: str            # s3://…/tenants/<t>/jobs/<id>/spec.json — the job directory is its folder
    spec: JobSpec            # for resources (gpus, nodes, max runtime)
    env: dict[str, str] = {}  # extra environment for the trainer (e.g. AWS_ENDPOINT_URL)


class AttemptState(msgspec.Struct, frozen=True, kw_only=True):
    state: RunState
    reason: str | None = None     # a trainer.core.failures.Reason value when known (oom, preempted, …)
    message: str | None = None
    exit_code: int | None = None
    # The attempt is over for the service, but what runs it still holds resources (a pod that cannot
    # start, one on a lost node): the service must cancel it before anything else.
    holds_resources: bool = False


@runtime_checkable
class Launcher(Protocol):
    def submit(self, request: LaunchRequest) -> None:
        """Start the attempt. Idempotent for (job_id, attempt): a second call is a no-op."""

    def cancel(self, tenant: str, job_id: str, attempt: int) -> None:
        """Stop the attempt (after the trainer was asked to checkpoint via the `cancel` marker)."""

    def state(self, tenant: str, job_id: str, attempt: int) -> AttemptState:
        """What the launcher sees of the attempt right now."""

    def logs(self, tenant: str, job_id: str, attempt: int, tail_lines: int = 200) -> str:
        """The attempt's recent log lines (may be empty when nothing is known)."""
