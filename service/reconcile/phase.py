"""A job's phase: the merge of job.json (what the service decided) and status.json (what the trainer
reported). Pure functions, so every combination is unit-tested without a store or a launcher.

The launcher's view enters through the reconciler, which writes its conclusions (lost, killed, exit
codes, final phases) into job.json; reads therefore cost two GETs and never a launcher call.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.state.jobstore import JobRecord
from trainer.core.failures import exit_code_for, is_retryable
from trainer.core.status import TERMINAL_PHASES, ErrorInfo, JobStatus


@dataclass(frozen=True)
class Effective:
    phase: str
    error: ErrorInfo | None
    # The trainer's status belongs to the current attempt (its progress and outputs are current).
    status_current: bool


def will_retry(record: JobRecord, status: JobStatus) -> bool:
    """A failed attempt that another attempt may fix (trainer/core/failures.py's retryable reasons, attempts left,
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


def close_reported(record: JobRecord, status: JobStatus | None) -> bool:
    """Records in `record` the end its current attempt's trainer reported (a terminal `status.json`):
    the attempt's end, reason and exit code and, unless another attempt follows, the job's final
    phase; True when that changed the record. The reconciler writes the result; the API applies it
    to each record it reads, so what GET shows and what DELETE and cancel decide are one view, the
    one job.json is about to hold. Times are the trainer's report, so both agree to the digit."""
    if (record.final_phase is not None or record.state != "launched" or status is None
            or status.attempt != record.attempt or status.phase not in TERMINAL_PHASES):
        return False
    last = record.attempts[-1] if record.attempts else None
    ended = max(status.updated_at, last.launched_at if last is not None else 0.0)
    error = status.error
    if last is not None and last.ended_at is None:
        last.ended_at, last.reason = ended, error.reason if error else None
        last.message = error.message if error else None
        # The trainer exits with the code of the end it reported (trainer/core/failures.py), so that code is
        # known before the launcher sees the exit.
        last.exit_code = exit_code_for(error.reason if error and status.phase != "succeeded" else None)
    if not will_retry(record, status):
        record.state, record.final_phase = "finished", status.phase  # type: ignore[assignment]
        record.error = error if status.phase != "succeeded" else None
        record.finished_at = ended
    return True


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
