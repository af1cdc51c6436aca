"""The reconciler: moves active jobs forward. Launches queued jobs within the deployment's limit,
finishes jobs whose trainer reported a terminal state, starts the next attempt after a retryable
failure, declares attempts lost when their heartbeat stopped and the launcher no longer knows them,
escalates cancels after the grace period, queues webhooks (service/state/outbox.py delivers them) and expires
old jobs.

Everything it decides is written to job.json; it holds no state between passes, so it can stop and
start (or run on several replicas: each attempt is claimed with a conditional PUT of
`attempts/<n>` before the launcher is called, so one replica launches it) without losing jobs.
Active jobs are found through the tenants' `slots/`, so a pass costs O(active jobs), not O(all jobs).

One owner per attempt: the service alone retries. A superseded attempt is cancelled when the next is
queued, and attempt n+1 is launched only once the launcher no longer sees attempt n running or
pending, so two trainers never write into one job folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.state.jobstore import AttemptRecord, JobRecord, JobStore, index_name, job_id_of_index
from service.launchers.base import AttemptState, Launcher, LaunchRequest, RunState
from service.api.metrics import Metrics
from service.state.outbox import WebhookDispatcher
from service.reconcile.phase import close_reported, effective, will_retry
from service.settings import Settings
from service.tenants import TenantRegistry
from service.reconcile.webhooks import WebhookEvent
from trainer.core.failures import Reason, is_retryable, reason_for_exit
from trainer.core.jobkeys import CANCEL_KEY, SPEC_KEY
from trainer.core.spec import SpecError, decode_spec
from trainer.core.status import TERMINAL_PHASES, ErrorInfo, JobStatus
from trainer.core.storage import NotFound, StorageError

log = logging.getLogger("lathe.reconciler")

ORPHAN_SLOT_AFTER_S = 120.0  # a slot whose job.json never appeared (a submit died half-way)
RETENTION_BATCH = 100


def retry_backoff_s(attempt: int, base_s: float = 5.0) -> float:
    """Pause before attempt n+1: base, 2 × base, 4 × base … capped at 5 minutes."""
    return min(base_s * 2 ** (attempt - 1), 300.0)


@dataclass
class _Active:
    tenant: str
    slot: str
    record: JobRecord
    status: JobStatus | None


class Reconciler:
    def __init__(self, settings: Settings, store: JobStore, tenants: TenantRegistry, launcher: Launcher, *,
                 metrics: Metrics | None = None, webhooks: WebhookDispatcher | None = None,
                 clock: Callable[[], float] = time.time, launch_env: dict[str, str] | None = None) -> None:
        self.settings, self.store, self.tenants, self.launcher = settings, store, tenants, launcher
        self.metrics, self.webhooks, self.clock = metrics, webhooks, clock
        self.launch_env = dict(launch_env or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_retention = 0.0
        self._slot_cache: dict[str, dict[tuple[str, str], str]] = {}  # per tenant, see JobStore.active_slots

    # -- loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and self.settings.reconcile_interval_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lathe-reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 — the loop must survive a bad pass (store outage, bug)
                log.exception("reconcile pass failed; retrying")
            self._stop.wait(self.settings.reconcile_interval_s)

    # -- one pass -------------------------------------------------------------------------------
    def tick(self) -> None:
        t0 = time.monotonic()
        active = self._active_jobs()
        running = sum(1 for a in active if a.record.state == "launched")
        by_phase: dict[str, int] = {}
        for item in sorted(active, key=lambda a: a.record.submitted_at):  # FIFO across tenants
            try:
                launched = self._advance(item, running)
            except StorageError as exc:
                log.warning("job %s: store error, will retry: %s", item.record.job_id, exc)
                continue
            running += launched
            phase = effective(item.record, item.status).phase
            by_phase[phase] = by_phase.get(phase, 0) + 1
        if self.metrics is not None:
            for phase in ("queued", "preparing", "training", "shrinking", "uploading"):
                self.metrics.jobs_active.labels(phase).set(by_phase.get(phase, 0))
            self.metrics.reconcile_seconds.observe(time.monotonic() - t0)
        if self.settings.retention_s > 0 and self.clock() - self._last_retention > 60:
            self._last_retention = self.clock()
            self.expire_old_jobs()

    def _active_jobs(self) -> list[_Active]:
        out: list[_Active] = []
        now = self.clock()
        for tenant in self.tenants:
            slots = self.store.active_slots(tenant.name, self._slot_cache.setdefault(tenant.name, {}))
            for slot, job_id in slots.items():
                try:
                    record = self.store.read_record(tenant.name, job_id)
                except NotFound:
                    self._maybe_release_orphan(tenant.name, slot, job_id, now)
                    continue
                if record.slot is not None and record.slot != slot:
                    # A second slot for one job: a retried submit finished the job of one that died
                    # after taking a slot. The job keeps the slot its record names.
                    log.info("releasing slot %s of %s: job %s holds %s", slot, tenant.name, job_id, record.slot)
                    self.store.release_slot(tenant.name, slot, job_id)
                    continue
                if record.cancel_requested_at is None and record.final_phase is None:
                    # The API only writes the `cancel` marker (job.json has one writer: this loop).
                    try:
                        record.cancel_requested_at = self.store.job_dir(tenant.name, job_id).head(CANCEL_KEY).last_modified
                    except NotFound:
                        pass
                # A queued job's phase does not depend on status.json (phase.effective): with a long
                # queue, not reading it halves the cost of a pass.
                queued = record.state == "queued" and record.final_phase is None
                status = None if queued else self.store.read_status(tenant.name, job_id)
                out.append(_Active(tenant.name, slot, record, status))
        return out

    def _maybe_release_orphan(self, tenant: str, slot: str, job_id: str, now: float) -> None:
        try:
            info = self.store.tenant(tenant).head(slot)
        except NotFound:
            return
        if now - info.last_modified > ORPHAN_SLOT_AFTER_S:
            log.info("releasing slot %s of %s: job %s was never created", slot, tenant, job_id)
            self.store.release_slot(tenant, slot, job_id)

    def _advance(self, item: _Active, running: int) -> int:
        """One step for one job; returns 1 when it launched an attempt."""
        rec, status, now = item.record, item.status, self.clock()
        self._phase_webhook(rec, status)
        if rec.state == "finished" or rec.final_phase is not None:
            if rec.final_phase is not None:  # queued already, unless a crash came between finishing and queueing
                self._send(rec, f"job.{rec.final_phase}", rec.final_phase)
            self._release(rec)
            return 0
        if rec.state == "queued":
            return self._advance_queued(rec, running, now)
        current = status if status is not None and status.attempt == rec.attempt else None
        if current is not None and current.phase in TERMINAL_PHASES:
            if will_retry(rec, current) and self._settled_elsewhere(rec, now):
                return 0
            self._attempt_reported(rec, current, now)
            return 0
        view = self.launcher.state(rec.tenant, rec.job_id, rec.attempt)
        if rec.cancel_requested_at is not None:
            self._advance_cancel(rec, view, now)
            return 0
        if view.state in (RunState.SUCCEEDED, RunState.FAILED):
            if view.holds_resources:  # e.g. a pod that can never start: free its GPUs and quota now
                self._stop_attempt(rec)
            # Exited without a terminal status.json for this attempt (or it landed just now: look again).
            again = self.store.read_status(rec.tenant, rec.job_id)
            if again is not None and again.attempt == rec.attempt and again.phase in TERMINAL_PHASES:
                item.status = again
                self._attempt_reported(rec, again, now)
                return 0
            self._attempt_ended(rec, view, now)
        elif view.state == RunState.GONE:
            beat = current.heartbeat_at if current is not None else rec.attempts[-1].launched_at if rec.attempts else 0
            if now - beat > self.settings.heartbeat_timeout_s:
                self._attempt_failed(rec, Reason.LOST.value, (
                    f"attempt {rec.attempt}: no heartbeat for {now - beat:.0f} s and the launcher no longer knows "
                    "the trainer (node lost or process killed)"), None, now)
        else:
            last = rec.attempts[-1] if rec.attempts else None
            if view.state == RunState.RUNNING and last is not None and last.started_at is None:
                last.started_at = now
                self.store.write_record(rec, now=now)
            self._check_deadline(rec, now)
        return 0

    def _settled_elsewhere(self, rec: JobRecord, now: float) -> bool:
        """A retryable report (the trainer answers SIGTERM with `preempted`) may hide why it got the
        SIGTERM: the launcher may know a final cause (the runtime limit). True when that decided the
        attempt, or when the attempt is still stopping and the decision waits for the next pass."""
        view = self.launcher.state(rec.tenant, rec.job_id, rec.attempt)
        if view.state is RunState.RUNNING:
            return True  # e.g. the other ranks still terminating: decide once they stopped
        if view.state is RunState.FAILED and view.reason is not None and not _retryable(view.reason):
            self._attempt_failed(rec, view.reason, f"attempt {rec.attempt}: {view.message or view.reason}",
                                 view.exit_code, now)
            return True
        return False

    def _advance_queued(self, rec: JobRecord, running: int, now: float) -> int:
        if rec.cancel_requested_at is not None:
            self._finish(rec, "cancelled", ErrorInfo(reason=Reason.CANCELLED.value, message="cancelled before it started"))
            return 0
        if now < rec.not_before:
            return 0
        limit = self.settings.max_running_jobs
        if limit and running >= limit:
            return 0
        if rec.attempt >= 1:
            previous = self.launcher.state(rec.tenant, rec.job_id, rec.attempt)
            if previous.state in (RunState.RUNNING, RunState.PENDING):
                # Still stopping (checkpoint on SIGTERM, pods terminating): never two trainers at once.
                log.info("job %s: attempt %d waits for attempt %d to stop (%s)", rec.job_id, rec.attempt + 1,
                         rec.attempt, previous.message)
                self._stop_attempt(rec)
                return 0
        try:
            spec = decode_spec(self.store.job_dir(rec.tenant, rec.job_id).get_bytes(SPEC_KEY), format="json")
        except SpecError as exc:  # failing the pass instead would hold back every queued job behind this one
            self._finish(rec, "failed", ErrorInfo(reason=Reason.SPEC_INVALID.value, message=(
                f"the stored spec.json no longer passes the spec check: {exc}")))
            return 0
        attempt = rec.attempt + 1
        rec.attempt, rec.state = attempt, "launched"
        rec.attempts.append(AttemptRecord(attempt=attempt, launched_at=now))
        # Written before the launcher call: a crash in between leaves an attempt the launcher does not
        # know, which the heartbeat rule turns into `lost` and retries.
        self.store.write_record(rec, now=now)
        waited_since = rec.submitted_at if attempt == 1 else rec.not_before
        if not self.store.claim_attempt(rec.tenant, rec.job_id, attempt, now):
            # Another replica read the same queued record and launched this attempt first: Kubernetes
            # Job names would make a second launch a no-op, separate local launchers would not.
            log.info("job %s attempt %d: launched by another replica", rec.job_id, attempt)
            return 1
        try:
            self.launcher.submit(LaunchRequest(job_id=rec.job_id, tenant=rec.tenant, attempt=attempt,
                                               spec_uri=self.store.spec_uri(rec.tenant, rec.job_id), spec=spec,
                                               env=dict(self.launch_env)))
        except Exception as exc:  # noqa: BLE001 — the launcher's own error types vary; all are reported
            log.warning("job %s attempt %d: launch failed: %s", rec.job_id, attempt, exc)
            self._attempt_failed(rec, Reason.INTERNAL.value, f"attempt {attempt}: the launcher refused it: {exc}", None, now)
            return 0
        if self.metrics is not None:
            self.metrics.launch_latency.observe(max(0.0, now - waited_since))
        log.info("job %s: attempt %d launched", rec.job_id, attempt)
        return 1

    def _advance_cancel(self, rec: JobRecord, view: AttemptState, now: float) -> None:
        if view.state in (RunState.RUNNING, RunState.PENDING):
            if now - (rec.cancel_requested_at or now) >= self.settings.cancel_grace_s:
                self.launcher.cancel(rec.tenant, rec.job_id, rec.attempt)
            return
        self._close_attempt(rec, Reason.CANCELLED.value, view.exit_code, "cancelled on request", now)
        self._finish(rec, "cancelled", ErrorInfo(reason=Reason.CANCELLED.value, message="cancelled on request"))

    def _check_deadline(self, rec: JobRecord, now: float) -> None:
        try:
            spec = decode_spec(self.store.job_dir(rec.tenant, rec.job_id).get_bytes(SPEC_KEY), format="json")
        except NotFound:
            return
        limit = spec.resources.max_runtime_s
        # From the attempt's start, not its launch: time queued (Kueue, scheduling) does not count.
        started = rec.attempts[-1].started_at if rec.attempts else None
        if limit and started is not None and now - started > limit:
            self.launcher.cancel(rec.tenant, rec.job_id, rec.attempt)
            self._close_attempt(rec, Reason.DEADLINE_EXCEEDED.value, None, f"ran over {limit} s", now)
            self._finish(rec, "failed", ErrorInfo(reason=Reason.DEADLINE_EXCEEDED.value, message=(
                f"the attempt ran longer than resources.max_runtime_s = {limit} s and was stopped")))

    # -- attempt outcomes -----------------------------------------------------------------------
    def _attempt_reported(self, rec: JobRecord, status: JobStatus, now: float) -> None:
        # The same transition the API shows before it is written here (phase.close_reported).
        close_reported(rec, status)
        if rec.final_phase is None:
            self._requeue(rec, now)
        else:
            self._finished(rec)

    def _attempt_ended(self, rec: JobRecord, view: AttemptState, now: float) -> None:
        reason = view.reason or (reason_for_exit(view.exit_code).value if reason_for_exit(view.exit_code) else None)
        if reason is None:  # exit 0 but no terminal status: the final write was lost
            reason = Reason.STORAGE_ERROR.value
        message = (f"attempt {rec.attempt}: the trainer exited (code {view.exit_code}) without reporting a final "
                   f"state: {view.message or reason}")
        self._attempt_failed(rec, reason, message, view.exit_code, now)

    def _attempt_failed(self, rec: JobRecord, reason: str, message: str, exit_code: int | None, now: float) -> None:
        self._close_attempt(rec, reason, exit_code, message, now)
        try:
            retryable = is_retryable(reason)
        except ValueError:
            retryable = False
        if retryable and rec.attempt < rec.max_attempts and rec.cancel_requested_at is None:
            rec.error = ErrorInfo(reason=reason, message=message)  # shown until the next attempt reports
            self._requeue(rec, now)
        else:
            self._finish(rec, "failed", ErrorInfo(reason=reason, message=message))

    def _close_attempt(self, rec: JobRecord, reason: str | None, exit_code: int | None, message: str | None,
                       now: float) -> None:
        if rec.attempts and rec.attempts[-1].ended_at is None:
            last = rec.attempts[-1]
            last.ended_at, last.reason, last.exit_code, last.message = now, reason, exit_code, message

    def _stop_attempt(self, rec: JobRecord) -> None:
        """Cancel the current attempt (idempotent); a launcher error is retried on the next pass."""
        try:
            self.launcher.cancel(rec.tenant, rec.job_id, rec.attempt)
        except Exception as exc:  # noqa: BLE001 — the launcher's own error types vary
            log.warning("job %s attempt %d: cancel failed, will retry: %s", rec.job_id, rec.attempt, exc)

    def _requeue(self, rec: JobRecord, now: float) -> None:
        self._stop_attempt(rec)  # superseded: e.g. a pod the Job or Kueue would start again
        rec.state = "queued"
        rec.not_before = now + retry_backoff_s(rec.attempt, self.settings.retry_backoff_s)
        self.store.write_record(rec, now=now)
        log.info("job %s: attempt %d failed (%s); attempt %d in %.0f s", rec.job_id, rec.attempt,
                 rec.attempts[-1].reason if rec.attempts else "?", rec.attempt + 1, rec.not_before - now)

    def _finish(self, rec: JobRecord, phase: str, error: ErrorInfo | None) -> None:
        rec.state, rec.final_phase = "finished", phase  # type: ignore[assignment]
        rec.error = error if phase != "succeeded" else None
        rec.finished_at = self.clock()
        self._finished(rec)

    def _finished(self, rec: JobRecord) -> None:
        """Writes a record whose end is decided, then tells (metrics, log, webhook) and frees its slot."""
        phase, error = rec.final_phase or "failed", rec.error
        self.store.write_record(rec, now=self.clock())
        if self.metrics is not None:
            self.metrics.jobs_finished.labels(phase).inc()
        log.info("job %s: %s%s", rec.job_id, phase, f" ({error.reason}: {error.message})" if error else "")
        self._send(rec, f"job.{phase}", phase)
        self._release(rec)

    def _release(self, rec: JobRecord) -> None:
        self.store.release_slot(rec.tenant, rec.slot, rec.job_id)

    # -- webhooks -------------------------------------------------------------------------------
    def _phase_webhook(self, rec: JobRecord, status: JobStatus | None) -> None:
        if not (self.settings.webhook_phase_changes and rec.webhook_url and self.webhooks):
            return
        phase = effective(rec, status).phase
        if phase not in TERMINAL_PHASES:
            self._send(rec, "job.phase", phase)

    def _send(self, rec: JobRecord, event_type: str, phase: str) -> None:
        if not rec.webhook_url or self.webhooks is None:
            return
        marker = f"{phase}@{rec.attempt}"
        if marker in rec.webhooks_queued:
            return
        data = {"id": rec.job_id, "tenant": rec.tenant, "name": rec.name, "phase": phase, "attempt": rec.attempt,
                "error": {"reason": rec.error.reason, "message": rec.error.message} if rec.error else None}
        # In the outbox before it is marked: a crash in between queues it again under the same webhook-id.
        self.webhooks.enqueue(WebhookEvent(url=rec.webhook_url, msg_id=f"{rec.job_id}-{phase}-{rec.attempt}",
                                           type=event_type, data=data))
        rec.webhooks_queued.append(marker)
        self.store.write_record(rec, now=self.clock())

    # -- retention ------------------------------------------------------------------------------
    def expire_old_jobs(self) -> int:
        """Delete finished jobs submitted before now − retention. The index is newest first, so the
        expired ones are exactly those listed after the cutoff's marker: bounded work per pass."""
        cutoff = index_name(self.clock() - self.settings.retention_s, "")
        removed = 0
        for tenant in self.tenants:
            for name in list(self.store.index(tenant.name, start_after=cutoff, limit=RETENTION_BATCH)):
                try:
                    rec = self.store.read_record(tenant.name, job_id_of_index(name))
                except NotFound:
                    self.store.tenant(tenant.name).delete(f"index/{name}")
                    continue
                if rec.final_phase is None:
                    continue  # never expire an active job
                self.store.delete_job(rec)
                removed += 1
        return removed


def _retryable(reason: str) -> bool:
    try:
        return is_retryable(reason)
    except ValueError:
        return False
