"""Failure reasons and trainer exit codes, torch-free.

One exit code per reason lets Kubernetes' podFailurePolicy tell retryable failures (preempted,
storage_error, internal) from final ones (spec_invalid, dataset_invalid, model_invalid, nan_loss,
adapter_mismatch, dataset_changed, cancelled) without reading any log.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    INTERNAL = "internal"
    SPEC_INVALID = "spec_invalid"
    DATASET_INVALID = "dataset_invalid"
    MODEL_INVALID = "model_invalid"
    NAN_LOSS = "nan_loss"
    ADAPTER_MISMATCH = "adapter_mismatch"  # an adapter does not fit its base (architecture, layer shapes)
    DATASET_CHANGED = "dataset_changed"  # a rerun's dataset bytes differ from the job it repeats
    PREEMPTED = "preempted"
    STORAGE_ERROR = "storage_error"
    CANCELLED = "cancelled"
    # Decided outside the trainer (Kubernetes / the launcher), never an exit code of ours.
    OOM = "oom"
    IMAGE_PULL_ERROR = "image_pull_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    LOST = "lost"
    UNSCHEDULABLE = "unschedulable"  # admitted but never started within the start timeout
    SCRATCH_FULL = "scratch_full"  # the kubelet evicted the pod: its scratch outgrew the emptyDir limit
    CONFIG_ERROR = "config_error"  # the pod cannot start: a Secret / volume it names is missing


EXIT_CODES: dict[Reason, int] = {
    Reason.INTERNAL: 1,
    Reason.SPEC_INVALID: 10,
    Reason.DATASET_INVALID: 11,
    Reason.MODEL_INVALID: 12,
    Reason.NAN_LOSS: 13,
    Reason.ADAPTER_MISMATCH: 14,
    Reason.DATASET_CHANGED: 15,
    Reason.PREEMPTED: 20,
    Reason.STORAGE_ERROR: 21,
    Reason.CANCELLED: 22,
}
REASON_BY_EXIT: dict[int, Reason] = {code: reason for reason, code in EXIT_CODES.items()}

RETRYABLE: frozenset[Reason] = frozenset(
    {Reason.INTERNAL, Reason.PREEMPTED, Reason.STORAGE_ERROR, Reason.LOST}
)
# Exit codes after which another attempt cannot help (podFailurePolicy action FailJob).
FINAL_EXIT_CODES: tuple[int, ...] = tuple(
    sorted(code for reason, code in EXIT_CODES.items() if reason not in RETRYABLE)
)
SUCCESS_EXIT = 0


def reason_for_exit(code: int | None) -> Reason | None:
    """The failure reason an exit code stands for; None for success; unknown codes are internal."""
    if code is None or code == SUCCESS_EXIT:
        return None
    return REASON_BY_EXIT.get(code, Reason.INTERNAL)


def exit_code_for(reason: Reason | str | None) -> int:
    """The code the trainer exits with after reporting an end with `reason` (None: it succeeded);
    a reason that is none of the trainer's own counts as internal."""
    if reason is None:
        return SUCCESS_EXIT
    try:
        return EXIT_CODES.get(Reason(reason), EXIT_CODES[Reason.INTERNAL])
    except ValueError:
        return EXIT_CODES[Reason.INTERNAL]


def is_retryable(reason: Reason | str) -> bool:
    return Reason(reason) in RETRYABLE


class JobFailure(Exception):
    """A failure with a machine-readable reason; `message` names the field/file and what to do."""

    def __init__(self, reason: Reason | str, message: str) -> None:
        super().__init__(message)
        self.reason = Reason(reason)
        self.message = message

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.reason)

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"
