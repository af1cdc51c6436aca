"""A job's phase: the merge of job.json (what the service decided) and status.json (what the trainer
reported). Pure functions, so every combination is unit-tested without a store or a launcher.

The launcher's view enters through the reconciler, which writes its conclusions (lost, killed, exit
codes, final phases) into job.json; reads therefore cost two GETs and never a launcher call.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.jobstore import JobRecord
from trainer.failures import is_retryable
from trainer.status import TERMINAL_PHASES, ErrorInfo, JobStatus


@dataclass(frozen=True)
class Effective:
    phase: str
    error: ErrorInfo | None
    # The trainer's status belongs to the current attempt (its progress and outputs are current).
    status_current: bool


def will_retry(record: JobRecord, status: JobStatus) -> bool:
    """A failed attempt that another attempt may fix (design.md's retryable reasons, attempts left,
    no cancel requested)."""
    return (
        status.phase == "failed"
        and status.error is not None
        and _retryable(status.error.reason)
        and record.attempt < record.max_attempts
        and record.cancel_requested_at is None
    )


def effective(record: JobRecord, status: JobStatus | None) -> Effective:
    if record.final_phase is not None:
        current = status is not None and status.attempt == record.attempt
        return Effective(record.final_phase, record.error, current)
    if record.state == "queued" or record.attempt == 0:
        return Effective("queued", _retry_cause(record), False)
    if status is None or status.attempt < record.attempt:
        # Launched; the trainer of this attempt has not reported yet (scheduling, image pull, start-up).
        return Effective("queued", None, False)
    if status.phase in TERMINAL_PHASES:
        if will_retry(record, status):
            return Effective("queued", status.error, True)
        return Effective(status.phase, status.error, True)
    return Effective(status.phase, None, True)


def _retry_cause(record: JobRecord) -> ErrorInfo | None:
    """For a job queued again after a failed attempt (waiting out its backoff), that attempt's error:
    otherwise the job looked like a fresh submit, with no hint why it went back to the queue."""
    last = record.attempts[-1] if record.attempts else None
    if last is None or last.reason is None:
        return None
    return ErrorInfo(reason=last.reason, message=last.message or "")


def _retryable(reason: str) -> bool:
    try:
        return is_retryable(reason)
    except ValueError:  # a reason this service does not know: do not loop on it
        return False
