"""The service's state in the object store (the store is the only state).

    <root>/tenants/<tenant>/
      jobs/<job_id>/spec.json, job.json, status.json (trainer), cancel, logs/, output/
      jobs/<job_id>/attempts/<n>     launch claim of attempt n (conditional PUT: one launcher call)
      index/<inverted-time>-<job_id> empty markers, newest first
      idempotency/<sha256(key)>      {job_id, body_sha256} (conditional PUT)
      slots/<i>                      one per queued/running job, i < max_concurrent_jobs
                                     (conditional PUT: the tenant's concurrency limit holds across replicas)

`slots/` is also how the reconciler finds the active jobs without scanning finished ones.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import time
from collections.abc import Iterator
from typing import Literal

import msgspec

from trainer.core.jobkeys import CANCEL_KEY, JOB_KEY, SPEC_KEY, STATUS_KEY
from trainer.core.status import ErrorInfo, JobStatus
from service.api.wire import PreflightReport
from trainer.core.storage import NotFound, PreconditionFailed, Store


JOB_ID_RE = re.compile(r"^j-[0-9]{8}t[0-9]{6}-[0-9a-f]{8}$")
# Inverted milliseconds: lexicographic order of index markers is newest first until the year 5138.
_INVERT_MS = 10**14
# Random slot indices a submit tries before listing the taken ones (see JobStore.claim_slot).
SLOT_PROBES = 3


def new_job_id(now: float | None = None) -> str:
    """`j-<yyyymmddThhmmss>-<8 hex>`, lowercase and DNS-safe (Kubernetes names derive from it)."""
    stamp = time.strftime("%Y%m%dt%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"j-{stamp}-{secrets.token_hex(4)}"


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_RE.match(value))


def index_name(submitted_at: float, job_id: str) -> str:
    return f"{_INVERT_MS - int(submitted_at * 1000):014d}-{job_id}"


def job_id_of_index(name: str) -> str:
    return name.split("-", 1)[1]


class AttemptRecord(msgspec.Struct, kw_only=True):
    attempt: int
    launched_at: float
    started_at: float | None = None  # first seen running by the launcher (the runtime limit counts from here)
    ended_at: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    message: str | None = None


class JobRecord(msgspec.Struct, kw_only=True):
    """job.json: the submit record and what only the service decides."""

    job_id: str
    tenant: str
    submitted_at: float
    spec_hash: str
    name: str | None = None
    kind: str = "train"  # the spec's job kind (records written before kinds existed are training jobs)
    idempotency_key_sha256: str | None = None
    max_attempts: int = 1
    # queued (never launched or waiting for the next attempt), launched, or finished (final_phase set).
    state: Literal["queued", "launched", "finished"] = "queued"
    attempt: int = 0  # the attempt launched last (0: none yet)
    attempts: list[AttemptRecord] = []
    not_before: float = 0.0  # a retry waits until then (backoff)
    cancel_requested_at: float | None = None
    final_phase: Literal["succeeded", "failed", "cancelled"] | None = None
    error: ErrorInfo | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    slot: str | None = None  # slots/<i> held while active
    webhook_url: str | None = None
    # "<phase>@<attempt>" already in the webhook outbox (service/state/outbox.py), so each is queued once.
    webhooks_queued: list[str] = msgspec.field(default_factory=list, name="webhooks_sent")
    warnings: list[str] = []
    preflight: PreflightReport | None = None


class IdempotencyRecord(msgspec.Struct, kw_only=True):
    job_id: str
    body_sha256: str
    created_at: float


class JobStore:
    """Typed access to one deployment's state root."""

    def __init__(self, root: Store) -> None:
        self.root = root

    # -- layout ---------------------------------------------------------------------------------
    def tenant(self, tenant: str) -> Store:
        return self.root.child(f"tenants/{tenant}/")

    def job_dir(self, tenant: str, job_id: str) -> Store:
        return self.root.child(f"tenants/{tenant}/jobs/{job_id}/")

    def job_uri(self, tenant: str, job_id: str) -> str:
        return self.root.uri(f"tenants/{tenant}/jobs/{job_id}/")

    def spec_uri(self, tenant: str, job_id: str) -> str:
        return self.root.uri(f"tenants/{tenant}/jobs/{job_id}/{SPEC_KEY}")

    # -- job records ----------------------------------------------------------------------------
    def read_record(self, tenant: str, job_id: str) -> JobRecord:
        """Raises trainer.core.storage.NotFound when the job does not exist (for this tenant)."""
        return self.job_dir(tenant, job_id).get_json(JOB_KEY, JobRecord)

    def write_record(self, record: JobRecord, *, now: float | None = None) -> None:
        record.updated_at = time.time() if now is None else now
        self.job_dir(record.tenant, record.job_id).put_json(JOB_KEY, record)

    def read_status(self, tenant: str, job_id: str) -> JobStatus | None:
        try:
            return self.job_dir(tenant, job_id).get_json(STATUS_KEY, JobStatus)
        except NotFound:
            return None
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None  # a status written by an incompatible trainer: the record still answers

    def create_job(self, record: JobRecord, spec_json: bytes, *, reserved: bool = False) -> bool:
        """spec.json, the index marker, then job.json (only if absent); True when this call created
        the job. job.json last: a job that exists is always listed (a submit killed half-way leaves
        at most a spec and a marker, which lists skip), and it is never overwritten, since the
        reconciler may already be advancing it. `reserved`: the job id comes from an Idempotency-Key,
        so a spec.json already there was written for this very job by an earlier request."""
        job = self.job_dir(record.tenant, record.job_id)
        try:
            job.put_bytes(SPEC_KEY, spec_json, content_type="application/json", if_none_match=True)
        except PreconditionFailed:
            if not reserved:
                raise
        self.tenant(record.tenant).put_bytes(f"index/{index_name(record.submitted_at, record.job_id)}", b"")
        record.updated_at = record.submitted_at
        try:
            job.put_json(JOB_KEY, record, if_none_match=True)
        except PreconditionFailed:
            if not reserved:
                raise
            return False
        return True

    def request_cancel(self, tenant: str, job_id: str) -> None:
        self.job_dir(tenant, job_id).put_bytes(CANCEL_KEY, b"", content_type="text/plain")

    def delete_job(self, record: JobRecord) -> None:
        """Index marker first (the job disappears from lists), then the directory, job.json last."""
        tenant = self.tenant(record.tenant)
        tenant.delete(f"index/{index_name(record.submitted_at, record.job_id)}")
        job = self.job_dir(record.tenant, record.job_id)
        for info in list(job.list("")):
            if info.key != JOB_KEY:
                job.delete(info.key)
        job.delete(JOB_KEY)
        if record.idempotency_key_sha256:
            try:
                tenant.delete(f"idempotency/{record.idempotency_key_sha256}")
            except NotFound:
                pass

    # -- listing --------------------------------------------------------------------------------
    def index(self, tenant: str, *, start_after: str | None, limit: int) -> Iterator[str]:
        """Index marker names, newest first; at most `limit` per call (bounded work)."""
        store = self.tenant(tenant)
        after = f"index/{start_after}" if start_after else None
        for info in store.list("index/", start_after=after, limit=limit):
            yield info.key[len("index/"):]

    # -- idempotency ----------------------------------------------------------------------------
    @staticmethod
    def key_hash(idempotency_key: str) -> str:
        return hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()

    def read_idempotency(self, tenant: str, key_hash: str) -> IdempotencyRecord | None:
        try:
            return self.tenant(tenant).get_json(f"idempotency/{key_hash}", IdempotencyRecord)
        except NotFound:
            return None

    def claim_idempotency(self, tenant: str, key_hash: str, record: IdempotencyRecord) -> bool:
        """True when this call created the key; False when another request holds it."""
        try:
            self.tenant(tenant).put_json(f"idempotency/{key_hash}", record, if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    # -- concurrency slots ----------------------------------------------------------------------
    def active_slots(self, tenant: str, cache: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
        """slot key → job id of the tenant's queued and running jobs. With `cache` ((key, ETag) →
        job id, kept by the caller between calls), only slots written since the last call are read:
        a slot object never changes while it exists, so a pass over a long queue costs one listing,
        not one GET per queued job."""
        store = self.tenant(tenant)
        out: dict[str, str] = {}
        seen: set[tuple[str, str]] = set()
        for info in store.list("slots/"):
            ident = (info.key, info.etag)
            seen.add(ident)
            if cache is not None and ident in cache:
                out[info.key] = cache[ident]
                continue
            try:
                out[info.key] = store.get_bytes(info.key).decode("utf-8")
            except NotFound:
                continue  # released meanwhile
            if cache is not None:
                cache[ident] = out[info.key]
        if cache is not None:
            for ident in [i for i in cache if i not in seen]:
                del cache[ident]
        return out

    def claim_slot(self, tenant: str, job_id: str, limit: int) -> str | None:
        """A free `slots/<i>` (i < limit) now holding `job_id`, or None when all are taken.
        Conditional PUTs make the limit exact even with concurrent submits on several replicas.

        With a large limit, a few random indices are tried first: listing every taken slot costs
        O(the tenant's active jobs) per submit (with 600 queued jobs, a submit's CPU time went from
        ~70 to ~160 ms, and that is what capped the submit rate under load). The listing remains the
        fallback, and the only way to conclude that the limit is reached."""
        store = self.tenant(tenant)
        if limit > 4 * SLOT_PROBES:
            for i in random.sample(range(limit), SLOT_PROBES):
                key = f"slots/{i:05d}"
                try:
                    store.put_bytes(key, job_id.encode("utf-8"), content_type="text/plain", if_none_match=True)
                except PreconditionFailed:
                    continue
                return key
        taken = {info.key for info in store.list("slots/")}
        for i in range(limit):
            key = f"slots/{i:05d}"
            if key in taken:
                continue
            try:
                store.put_bytes(key, job_id.encode("utf-8"), content_type="text/plain", if_none_match=True)
            except PreconditionFailed:
                continue
            return key
        return None

    def release_slot(self, tenant: str, slot: str | None, job_id: str) -> None:
        if not slot:
            return
        store = self.tenant(tenant)
        try:
            if store.get_bytes(slot).decode("utf-8") == job_id:
                store.delete(slot)
        except NotFound:
            pass

    # -- attempts -------------------------------------------------------------------------------
    def claim_attempt(self, tenant: str, job_id: str, attempt: int, now: float) -> bool:
        """One replica wins the launch of attempt n; the others leave it alone."""
        try:
            self.job_dir(tenant, job_id).put_json(f"attempts/{attempt}", {"claimed_at": now}, if_none_match=True)
        except PreconditionFailed:
            return False
        return True
