"""The job API's behaviour, free of HTTP: validate, submit, read, list, cancel, delete, logs, uploads.

Raises only service.api.errors; the app maps them to problem+json. All state goes to the object store
(service/state/jobstore.py), so any replica can serve any request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from trainer.core.jobkeys import DATASET_MANIFEST_NAME, LOG_KEY, METADATA_NAME, SPEC_KEY
from trainer.core.msgspec_errors import split_validation_error
from service.api import errors
from service.jobs.datareport import ReportLimits, run_report
from service.jobs.adapterheader import adapter_problems, read_header
from service.jobs.jobdiff import JobDiff, diff_jobs
from service.state.jobstore import (
    IdempotencyRecord, JobRecord, JobStore, is_job_id, job_id_of_index, new_job_id,
)
from service.launchers.base import Launcher
from service.reconcile.phase import close_reported, effective
from service.jobs.preflight import PreflightLimits, run_preflight
from service.settings import Settings
from service.tenants import Tenant, UriKind, uri_problem
from service.reconcile.webhooks import destination_problem
from service.api.wire import (
    AttemptView, DatasetReport, DatasetReportRequest, FieldProblem, JobCreate, JobList, JobSummary, JobView,
    OutputView, PreflightReport, UploadCreate, UploadGrant, UploadTarget, ValidationResult,
)
from trainer.core.spec import (
    TAGS_FILE,
    GridAdapterSpec,
    JobSpec,
    SpecError,
    adapter_label,
    encode_spec,
    spec_from_obj,
    spec_hash,
    warnings_for,
)
from trainer.core.status import TERMINAL_PHASES, JobStatus, Progress
from trainer.core.storage import NotFound, StorageError, Store, open_store, parse_uri

log = logging.getLogger("lathe.jobs")

INDEX_CURSOR_RE = re.compile(r"^[0-9]{14}-j-[0-9]{8}t[0-9]{6}-[0-9a-f]{8}$")
MAX_LOG_LINES = 10000
# An Idempotency-Key claimed this long ago whose job still does not exist belongs to a submit that died
# half-way (a killed service); a retry with the same key and body then creates that job itself. Far
# above a submit's normal duration, so a slow first request is normally waited for, not raced.
ADOPT_AFTER_S = 10.0


class JobService:
    def __init__(self, settings: Settings, store: JobStore, *, launcher: Launcher | None = None,
                 preflight: Callable[[JobSpec], PreflightReport] | None = None,
                 opener: Callable[[str], Store] = open_store, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.store, self.launcher, self.clock = settings, store, launcher, clock
        self._opener = opener
        limits = PreflightLimits(settings.preflight_max_files, settings.preflight_workers,
                                 settings.preflight_header_bytes, settings.max_image_pixels)
        self._preflight = preflight or (lambda spec: run_preflight(spec, limits, self._open_cached))
        self._report_limits = ReportLimits(limits)
        self._stores: dict[str, Store] = {}
        self._stores_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="lathe-read")

    # -- checks ---------------------------------------------------------------------------------
    def check(self, tenant: Tenant, body: JobCreate,
              preflight: bool = True) -> tuple[JobSpec, PreflightReport | None, list[FieldProblem]]:
        """Spec, tenant URIs and limits, then the dataset preflight (unless `preflight` is False: the
        console's checks as the user types). Returns the spec as it will run (with the tenant's max
        runtime filled in), the report and the warnings."""
        try:
            spec = spec_from_obj(body.spec)
        except SpecError as exc:
            shown = "; ".join(f"{p.path}: {p.message}" for p in exc.problems[:3])
            raise errors.InvalidSpec(
                f"{len(exc.problems)} problem(s) in the spec: {shown}" + ("; …" if len(exc.problems) > 3 else ""),
                problems=[FieldProblem(path=p.path, message=p.message, severity=p.severity) for p in exc.problems],
            ) from None
        spec = self._expand_grid_jobs(tenant, spec)
        self._check_uris(tenant, spec)
        self._check_adapter_headers(spec)
        self._check_tagger(spec)
        self._check_webhook(body.webhook_url)
        spec = self._apply_limits(tenant, spec)
        if spec.dataset is None or not preflight:  # a post-training job: no dataset to inspect
            warnings = [FieldProblem(path=w.path, message=w.message, severity="warning") for w in warnings_for(spec)]
            return spec, None, warnings
        report = self._preflight(spec)
        errors_ = [p for p in report.problems if p.severity == "error"]
        if errors_:
            raise errors.PreflightFailed(
                f"{len(errors_)} dataset problem(s) would fail the run: " + "; ".join(f"{p.path}: {p.message}" for p in errors_[:3]),
                problems=errors_, preflight=report,
            )
        warnings = [FieldProblem(path=w.path, message=w.message, severity="warning") for w in warnings_for(spec)]
        return spec, report, warnings + report.warnings

    def _expand_grid_jobs(self, tenant: Tenant, spec: JobSpec) -> JobSpec:
        """`grid.adapters[i].job` → one entry per save of that finished job (the epoch/step saves still
        kept, then the final file), each with its URI; the stored spec is the one that runs."""
        if spec.kind != "grid" or spec.grid is None:
            return spec
        expanded: list[GridAdapterSpec] = []
        problems: list[FieldProblem] = []
        for i, entry in enumerate(spec.grid.adapters):
            if entry.job is None or entry.uri is not None:
                expanded.append(entry)
                continue
            path = f"grid.adapters[{i}].job"
            try:
                record, status = self.get_with_status(tenant, entry.job)
            except errors.NotFound as exc:
                problems.append(FieldProblem(path=path, message=f"{exc}; name one of this tenant's jobs"))
                continue
            phase = effective(record, status).phase
            if phase != "succeeded" or status is None:
                problems.append(FieldProblem(path=path, message=(
                    f"job {entry.job} is {phase}, not succeeded: a grid compares a finished job's saves; wait for "
                    "it to finish, or name adapter files with uri")))
                continue
            saves = sorted((o for o in status.outputs if o.kind in GRID_SAVE_KINDS),
                           key=lambda o: (o.kind == "adapter", o.name))
            if not saves:
                problems.append(FieldProblem(path=path, message=(
                    f"job {entry.job} (kind {record.kind!r}) published no adapter to compare")))
            prefix = f"{entry.label}/" if entry.label else ""
            expanded += [GridAdapterSpec(uri=o.uri, job=entry.job, label=prefix + adapter_label(o.name)) for o in saves]
        if not problems and len(expanded) > 1 and "saves" not in (spec.grid.x, spec.grid.y):
            problems.append(FieldProblem(path="grid.adapters", message=(
                f"{len(expanded)} saves to compare but saves is not an axis; set grid.x or grid.y to \"saves\"")))
        if problems:
            raise errors.InvalidSpec("grid.adapters: " + "; ".join(f"{p.path}: {p.message}" for p in problems),
                                     problems=problems)
        return msgspec.structs.replace(spec, grid=msgspec.structs.replace(spec.grid, adapters=expanded))

    def _check_adapter_headers(self, spec: JobSpec) -> None:
        """The adapters of a merge or shrink job, by their safetensors headers (ranged GETs): not an
        adapter, or one of another architecture, is a 422 now instead of a failed job later."""
        problems = []
        for field, uri in _adapter_refs(spec):
            scheme, bucket, key = parse_uri(uri)
            if scheme != "s3":
                continue  # a trainer-local path: the trainer checks it
            store = self._open_cached(f"s3://{bucket}/")
            header = self._call(lambda: read_header(store, key))
            problems += adapter_problems(field, uri, header, spec.model.arch if spec.model else "sd1")
        if problems:
            raise errors.InvalidSpec(f"{len(problems)} adapter(s) do not fit this model: "
                                     + "; ".join(f"{p.path}: {p.message}" for p in problems), problems=problems)

    def _check_tagger(self, spec: JobSpec) -> None:
        """A caption job's tagger folder, by one listing: a 422 now when it has no selected_tags.csv
        or not exactly one .onnx model (the graph itself is checked by the trainer when it loads it)."""
        if spec.kind != "caption" or spec.model is None:
            return
        scheme, bucket, key = parse_uri(spec.model.uri)
        if scheme != "s3":
            return  # a trainer-local path: the trainer checks it
        prefix = key.rstrip("/") + "/" if key else ""
        store = self._open_cached(f"s3://{bucket}/")
        names = self._call(lambda: [o.key[len(prefix):] for o in store.list(prefix, limit=10000)])
        top = [n for n in names if "/" not in n]
        models = [n for n in top if n.lower().endswith(".onnx")]
        message = None
        if TAGS_FILE not in top and "config.json" in top:
            return  # a transformers sentence captioner: the trainer loads it
        if TAGS_FILE not in top:
            message = (f"{spec.model.uri} has no {TAGS_FILE}: a caption job's model is a WD14-format tagger folder "
                       f"(one .onnx model and its {TAGS_FILE}) or a transformers image-to-text folder (config.json)")
        elif len(models) != 1:
            message = f"{spec.model.uri}: expected one .onnx model next to {TAGS_FILE}, found {len(models)}"
        if message:
            problem = FieldProblem(path="model.uri", message=message)
            raise errors.InvalidSpec(f"model.uri: {message}", problems=[problem])

    def _check_webhook(self, url: str | None) -> None:
        """Refuse at submit what the sender would refuse at the job's end (a private destination), so
        the client learns now instead of never receiving the event."""
        if url is None or self.settings.webhook_allow_private:
            return
        problem = destination_problem(url)
        if problem is not None:
            raise errors.BadRequest(
                f"webhook_url: {problem}; give a public http(s) URL (private destinations are allowed only "
                "when the service runs with LATHE_WEBHOOK_ALLOW_PRIVATE=true)", field="webhook_url")

    def _check_uris(self, tenant: Tenant, spec: JobSpec) -> None:
        refs: list[tuple[str, str | None, UriKind]] = [
            ("model.uri", spec.model.uri if spec.model else None, "model"),
            ("model.vae", spec.model.vae if spec.model else None, "model"),
            ("caption.output_uri", spec.caption.output_uri if spec.caption else None, "output"),
            ("network.weights", spec.network.weights, "model"),
            ("dataset.uri", spec.dataset.uri if spec.dataset else None, "dataset"),
            ("dataset.reg_uri", spec.dataset.reg_uri if spec.dataset else None, "dataset"),
            ("dataset.expect_manifest", spec.dataset.expect_manifest if spec.dataset else None, "output"),
            ("save.output_uri", spec.save.output_uri, "output"),
        ]
        # An adapter to merge is a model the tenant may read, or one of its own jobs' outputs.
        problems = []
        for path, uri in _adapter_refs(spec):
            if not (tenant.allows("model", uri) or tenant.allows("output", uri)):
                allowed = ", ".join(tenant.prefixes("model") + tenant.prefixes("output"))
                problems.append(FieldProblem(path=path, message=(
                    f"{uri} is outside the model and output locations tenant '{tenant.name}' may read ({allowed}); "
                    "copy the adapter there or ask the operator to allow the prefix")))
        for path, uri, kind in refs:
            if uri is not None and not tenant.allows(kind, uri):
                allowed = ", ".join(tenant.prefixes(kind))
                malformed = uri_problem(uri)
                problems.append(FieldProblem(path=path, message=(
                    f"{malformed} (the {kind} locations tenant '{tenant.name}' may use: {allowed})" if malformed else
                    f"{uri} is outside the {kind} locations tenant '{tenant.name}' may use ({allowed}); "
                    "copy the data there or ask the operator to allow the prefix")))
        if problems:
            raise errors.Forbidden(f"{len(problems)} URI(s) outside the tenant's allowed prefixes", problems=problems)

    def _apply_limits(self, tenant: Tenant, spec: JobSpec) -> JobSpec:
        limits, res = tenant.limits, spec.resources
        gpus = res.gpus * res.nodes
        if gpus > limits.max_gpus_per_job:
            raise errors.LimitExceeded(
                f"the job asks for {gpus} GPUs (resources.gpus × resources.nodes); tenant '{tenant.name}' may use "
                f"{limits.max_gpus_per_job} per job", limit="max_gpus_per_job")
        if res.max_runtime_s is not None and res.max_runtime_s > limits.max_runtime_s:
            raise errors.LimitExceeded(
                f"resources.max_runtime_s {res.max_runtime_s} is above the limit of tenant '{tenant.name}', "
                f"{limits.max_runtime_s} s", limit="max_runtime_s")
        if res.max_runtime_s is None:
            spec = msgspec.structs.replace(
                spec, resources=msgspec.structs.replace(res, max_runtime_s=limits.max_runtime_s))
        return spec

    def dataset_report(self, tenant: Tenant, body: dict[str, Any]) -> DatasetReport:
        """The dataset report of POST /v1/datasets:report (`body`) or GET /v1/datasets/report (the query)."""
        try:
            req = msgspec.convert(body, DatasetReportRequest, strict=False)
        except msgspec.ValidationError as exc:
            path, message = split_validation_error(exc)
            unknown = re.match(r"Object contains unknown field `(.+)`", message)
            if unknown:
                allowed = ", ".join(DatasetReportRequest.__struct_fields__)
                path, message = unknown.group(1), f"unknown field; allowed: {allowed}"
            elif path == "subject":
                message += "; use 'character' or 'style'"
            raise errors.InvalidSpec(f"invalid dataset report request: {path or 'body'}: {message}",
                                     problems=[FieldProblem(path=path or "body", message=message)]) from None
        if not tenant.allows("dataset", req.uri):
            malformed = uri_problem(req.uri)
            allowed = ", ".join(tenant.prefixes("dataset"))
            raise errors.Forbidden("the dataset URI is outside the tenant's allowed prefixes", problems=[FieldProblem(
                path="uri", message=(f"{malformed} (the dataset locations tenant '{tenant.name}' may use: {allowed})"
                                     if malformed else f"{req.uri} is outside the dataset locations tenant "
                                     f"'{tenant.name}' may use ({allowed})"))])
        return run_report(req, self._report_limits, self._open_cached)

    def validate(self, tenant: Tenant, body: JobCreate, preflight: bool = True) -> ValidationResult:
        spec, report, warnings = self.check(tenant, body, preflight)
        return ValidationResult(ok=True, spec_hash=spec_hash(spec), warnings=warnings, preflight=report)

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, tenant: Tenant, body: JobCreate, idempotency_key: str | None) -> tuple[JobView, bool]:
        """(the job, created). A repeated Idempotency-Key with the same body returns the first job
        (created False); with another body it is a conflict."""
        body_hash = hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()
        key_hash = JobStore.key_hash(idempotency_key) if idempotency_key else None
        if key_hash:
            replay = self._replay(tenant, key_hash, body_hash)
            if replay is not None:
                return replay, False
        spec, report, warnings = self.check(tenant, body)
        now = self.clock()
        job_id, submitted_at, adopting = new_job_id(now), now, False
        # The idempotency key first: of concurrent duplicates exactly one goes on to take a slot.
        if key_hash:
            replay, held = self._claim_key(tenant, key_hash, body_hash, job_id, now)
            if replay is not None:
                return replay, False
            if held is not None:
                # The request holding the key died before creating its job (the service was killed
                # mid-submit): finish that job, under the id the key reserved. Without this, the key
                # stayed claimed by a job that never existed and every retry got a 503, forever.
                job_id, submitted_at, adopting = held.job_id, held.created_at, True
                log.warning("job %s: finishing the submit of a request that died (its Idempotency-Key was "
                            "claimed %.0f s ago and the job was never written)", job_id, now - held.created_at)
        slot: str | None = None
        try:
            slot = self._call(lambda: self.store.claim_slot(tenant.name, job_id, tenant.limits.max_concurrent_jobs))
            if slot is None:
                raise errors.LimitExceeded(
                    f"tenant '{tenant.name}' already has {tenant.limits.max_concurrent_jobs} queued or running jobs; "
                    "wait for one to finish or cancel one", limit="max_concurrent_jobs")
            record = JobRecord(
                job_id=job_id, tenant=tenant.name, submitted_at=submitted_at, spec_hash=spec_hash(spec), name=spec.name,
                kind=spec.kind,
                idempotency_key_sha256=key_hash, max_attempts=spec.resources.max_attempts, slot=slot,
                webhook_url=body.webhook_url, warnings=[f"{w.path}: {w.message}" for w in warnings], preflight=report,
            )
            created = self._call(lambda: self.store.create_job(record, encode_spec(spec), reserved=bool(key_hash)))
        except BaseException:
            # An adopted key is never given back: the request that claimed it may still be alive.
            self._undo_submit(tenant, job_id, slot, None if adopting else key_hash)
            raise
        if not created:
            # Another request with this key (the slow first one, or a concurrent retry) created the job
            # first: it keeps its own slot, this one gives its slot back.
            self._undo_submit(tenant, job_id, slot, None)
            return self.get(tenant, job_id), False
        return self._view(tenant, record, None), True

    def _claim_key(self, tenant: Tenant, key_hash: str, body_hash: str, job_id: str,
                   now: float) -> tuple[JobView | None, IdempotencyRecord | None]:
        """Claim the Idempotency-Key for `job_id`: (None, None) when this request won it. Otherwise
        (the job, None) once the holder's job exists, or (None, the holder's reservation) when its job
        still does not exist ADOPT_AFTER_S after the claim: that request died half-way."""
        mine = IdempotencyRecord(job_id=job_id, body_sha256=body_hash, created_at=now)
        deadline, delay = self.clock() + ADOPT_AFTER_S + 5.0, 0.05
        if self._call(lambda: self.store.claim_idempotency(tenant.name, key_hash, mine)):
            return None, None
        while True:
            held = self._call(lambda: self.store.read_idempotency(tenant.name, key_hash))
            if held is None:  # the first request failed and gave the key back: claim it again
                if self._call(lambda: self.store.claim_idempotency(tenant.name, key_hash, mine)):
                    return None, None
                continue  # another request claimed it just now: read that one
            if held.body_sha256 != body_hash:
                raise errors.Conflict(
                    f"Idempotency-Key was already used with a different request body (job {held.job_id}); "
                    "use a new key for a different job")
            try:
                return self.get(tenant, held.job_id), None
            except errors.NotFound:
                pass  # the first request is still writing the job, or died doing so
            if self.clock() - held.created_at >= ADOPT_AFTER_S:
                return None, held
            if self.clock() >= deadline:
                raise errors.Unavailable("a concurrent request with this Idempotency-Key did not complete; retry")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _undo_submit(self, tenant: Tenant, job_id: str, slot: str | None, key_hash: str | None) -> None:
        try:
            self.store.release_slot(tenant.name, slot, job_id)
            if key_hash:
                held = self.store.read_idempotency(tenant.name, key_hash)
                if held is not None and held.job_id == job_id and not self._job_exists(tenant, job_id):
                    # (A retry may have finished this job meanwhile; then the key must keep naming it.)
                    self.store.tenant(tenant.name).delete(f"idempotency/{key_hash}")
        except StorageError:
            pass  # best effort; the reconciler releases orphaned slots

    def _job_exists(self, tenant: Tenant, job_id: str) -> bool:
        try:
            self.store.read_record(tenant.name, job_id)
        except NotFound:
            return False
        return True

    def _replay(self, tenant: Tenant, key_hash: str, body_hash: str) -> JobView | None:
        """The job an earlier request with this key created, if it exists (without waiting)."""
        held = self._call(lambda: self.store.read_idempotency(tenant.name, key_hash))
        if held is None:
            return None
        if held.body_sha256 != body_hash:
            raise errors.Conflict(
                f"Idempotency-Key was already used with a different request body (job {held.job_id}); "
                "use a new key for a different job")
        try:
            return self.get(tenant, held.job_id)
        except errors.NotFound:
            return None  # still being written, or its request died: submit() sorts that out

    # -- read -----------------------------------------------------------------------------------
    def _record(self, tenant: Tenant, job_id: str) -> JobRecord:
        if not is_job_id(job_id):
            raise errors.NotFound(f"no job '{job_id}' (job ids look like j-20250101t120000-0123abcd)")
        try:
            return self._call(lambda: self.store.read_record(tenant.name, job_id))
        except errors.NotFound:
            raise errors.NotFound(f"no job '{job_id}'") from None

    def get(self, tenant: Tenant, job_id: str) -> JobView:
        record, status = self.get_with_status(tenant, job_id)
        return self._view(tenant, record, status)

    def get_with_status(self, tenant: Tenant, job_id: str) -> tuple[JobRecord, JobStatus | None]:
        """job.json with the end its trainer reported already applied (phase.close_reported), and
        status.json: the one view every read, cancel and delete decides from."""
        record = self._record(tenant, job_id)
        status = self._call(lambda: self.store.read_status(tenant.name, job_id))
        close_reported(record, status)
        return record, status

    def _view(self, tenant: Tenant, record: JobRecord, status: JobStatus | None, *, presign: bool = True) -> JobView:
        eff = effective(record, status)
        current = status if status is not None and eff.status_current else None
        outputs = []
        if current is not None:
            for out in current.outputs:
                # Presigned only inside the tenant's output locations (the rule delete follows): a
                # status.json naming another tenant's object must not hand out a URL to read it.
                url = self._presign(out.uri) if presign and tenant.allows("output", out.uri) else None
                outputs.append(OutputView(name=out.name, uri=out.uri, size=out.size, sha256=out.sha256, kind=out.kind,
                                          url=url))
        warnings = list(record.warnings) + (list(status.warnings) if status is not None else [])
        return JobView(
            id=record.job_id, name=record.name, kind=record.kind, phase=eff.phase, submitted_at=record.submitted_at,
            updated_at=max(record.updated_at, status.updated_at if status else 0.0), finished_at=record.finished_at,
            attempt=record.attempt, max_attempts=record.max_attempts,
            attempts=[AttemptView(attempt=a.attempt, launched_at=a.launched_at, ended_at=a.ended_at, reason=a.reason,
                                  exit_code=a.exit_code) for a in record.attempts],
            cancel_requested=record.cancel_requested_at is not None,
            revision=status.revision if status is not None else 0,
            progress=status.progress if status is not None else Progress(),
            error=eff.error, warnings=warnings, outputs=outputs,
            spec_uri=self.store.spec_uri(tenant.name, record.job_id), job_uri=self.store.job_uri(tenant.name, record.job_id),
            spec_hash=record.spec_hash, preflight=record.preflight,
        )

    def _presign(self, uri: str) -> str | None:
        try:
            scheme, bucket, key = parse_uri(uri)
        except ValueError:
            return None
        if scheme != "s3":
            return None
        return self._open_cached(f"s3://{bucket}/").presign_get(key, self.settings.presign_expires_s)

    def _open_cached(self, uri: str) -> Store:
        """Stores per bucket share one boto3 client (creating one costs milliseconds)."""
        scheme, bucket, key = parse_uri(uri)
        if scheme != "s3":
            return self._opener(uri)
        with self._stores_lock:
            base = self._stores.get(bucket)
            if base is None:
                base = self._stores[bucket] = self._opener(f"s3://{bucket}/")
        return base.child(key) if key else base

    # -- list -----------------------------------------------------------------------------------
    def list(self, tenant: Tenant, *, cursor: str | None, limit: int | None, phase: str | None) -> JobList:
        limit = min(limit or self.settings.page_size_default, self.settings.page_size_max)
        if cursor is not None and not INDEX_CURSOR_RE.match(cursor):
            raise errors.BadRequest("cursor is not one this API returned; start without it")
        # Bounded work per page: with a phase filter at most 5 pages' worth of jobs are examined;
        # the cursor then continues where the scan stopped even if the page is short.
        budget = limit * (5 if phase else 1)
        items: list[JobSummary] = []
        after = cursor
        exhausted = False
        while len(items) < limit and budget > 0:
            want = min(budget, limit - len(items)) + (0 if phase else 1)
            names = self._call(lambda: list(self.store.index(tenant.name, start_after=after, limit=want)))
            if len(names) < want:
                exhausted = True
            if not phase and len(names) > limit - len(items):
                names = names[: limit - len(items)]  # the extra one only told us that more exist
            budget -= len(names)
            summaries = self._summaries(tenant, [job_id_of_index(n) for n in names])
            for name, summary in zip(names, summaries):
                after = name
                if summary is not None and (phase is None or summary.phase == phase):
                    items.append(summary)
            if exhausted or not names:
                exhausted = True
                break
            if not phase:
                break
        return JobList(items=items, next_cursor=None if exhausted else after)

    def _summaries(self, tenant: Tenant, job_ids: list[str]) -> list[JobSummary | None]:
        def one(job_id: str) -> JobSummary | None:
            try:
                record = self.store.read_record(tenant.name, job_id)
            except NotFound:
                return None  # deleted meanwhile
            status = self.store.read_status(tenant.name, job_id)
            close_reported(record, status)
            eff = effective(record, status)
            prog = status.progress if status is not None else None
            return JobSummary(id=job_id, name=record.name, kind=record.kind, phase=eff.phase, submitted_at=record.submitted_at,
                              updated_at=max(record.updated_at, status.updated_at if status else 0.0),
                              finished_at=record.finished_at, attempt=record.attempt, step=prog.step if prog else 0,
                              total_steps=prog.total_steps if prog else 0, eta_s=prog.eta_s if prog else None,
                              loss=prog.avg_loss if prog else None, error=eff.error)

        return self._call(lambda: list(self._pool.map(one, job_ids)))

    # -- cancel / delete ------------------------------------------------------------------------
    def cancel(self, tenant: Tenant, job_id: str) -> JobView:
        """Writes the `cancel` marker (the trainer checkpoints and exits); the reconciler kills the
        attempt after the grace period and finishes queued jobs at once. Idempotent."""
        record, status = self.get_with_status(tenant, job_id)
        if effective(record, status).phase in TERMINAL_PHASES:
            return self._view(tenant, record, status)
        if record.cancel_requested_at is None:
            # Only the marker: job.json has a single writer (the reconciler), which picks it up.
            self._call(lambda: self.store.request_cancel(tenant.name, job_id))
            record.cancel_requested_at = self.clock()
        return self._view(tenant, record, status)

    def delete(self, tenant: Tenant, job_id: str) -> None:
        record = self._record(tenant, job_id)
        status = self._call(lambda: self.store.read_status(tenant.name, job_id))
        recorded = record.final_phase is not None
        close_reported(record, status)  # the view GET shows
        if record.final_phase is None:
            raise errors.Conflict(f"job {job_id} is not finished; cancel it first (POST /v1/jobs/{job_id}/cancel) "
                                  "and delete it once its phase is cancelled")
        if not recorded:
            # Its trainer reported the end; the reconciler, job.json's one writer, has yet to record it
            # and free the slot. Deleting first would leave it writing the record of a deleted job.
            self._wait_recorded(tenant, job_id)
        self._call(lambda: self._delete_outputs(tenant, job_id, status))
        self._call(lambda: self.store.delete_job(record))

    def _wait_recorded(self, tenant: Tenant, job_id: str) -> None:
        """Until job.json holds the job's end (within one reconcile pass); 503 if that takes longer."""
        deadline = time.monotonic() + 3 * self.settings.reconcile_interval_s + 2.0
        while self._record(tenant, job_id).final_phase is None:
            if time.monotonic() > deadline:
                raise errors.Unavailable(f"job {job_id} has finished, but the service has not recorded its end yet; "
                                         "retry the delete in a few seconds")
            time.sleep(0.1)

    def _delete_outputs(self, tenant: Tenant, job_id: str, status: JobStatus | None) -> None:
        """Outputs outside the job directory (a custom save.output_uri) go too: each listed output,
        then metadata.json. Files under the job directory go with it."""
        job_uri = self.store.job_uri(tenant.name, job_id)
        for out in (status.outputs if status else []):
            if out.uri.startswith(job_uri):
                continue
            parent, _, name = out.uri.rpartition("/")
            if not tenant.allows("output", out.uri):
                continue  # never delete outside the tenant's locations, whatever a status says
            store = self._open_cached(parent + "/")
            for key in (name, METADATA_NAME):
                try:
                    store.delete(key)
                except NotFound:
                    pass

    # -- logs -----------------------------------------------------------------------------------
    def diff(self, tenant: Tenant, a: str, b: str) -> JobDiff:
        """Spec fields, dataset files, model, versions and final loss that differ between two jobs."""
        return diff_jobs(a, b, self._stored(tenant, a), self._stored(tenant, b))

    def rerun(self, tenant: Tenant, job_id: str, force: bool) -> tuple[JobView, bool]:
        """Submit job `job_id`'s spec again against the same inputs. Its dataset is compared now by key,
        size and ETag with its dataset-manifest.json (409 naming the differences); the new job carries
        the manifest as dataset.expect_manifest so the trainer compares the bytes (sha256). `force`
        skips both comparisons."""
        old = self._stored(tenant, job_id)
        spec = old["spec"]
        manifest, manifest_uri = old["manifest"], old.get("manifest_uri")
        if spec.get("dataset") is not None:
            spec["dataset"].pop("expect_manifest", None)
            if manifest is not None and not force:
                changes = self._listing_changes(manifest)
                if changes:
                    raise errors.DatasetChanged(
                        f"{len(changes)} dataset file(s) differ from job {job_id}: " + "; ".join(changes[:10])
                        + " (lathe rerun --force runs anyway)",
                        problems=[FieldProblem(path="dataset.uri", message=c) for c in changes[:100]])
                spec["dataset"]["expect_manifest"] = manifest_uri
        record = self._record(tenant, job_id)
        return self.submit(tenant, JobCreate(spec=spec, webhook_url=record.webhook_url), None)

    def _listing_changes(self, manifest: dict) -> list[str]:
        """'<key>: added|removed|changed (size/ETag)' between a manifest and the store's listing now."""
        changes = []
        for dataset in manifest.get("datasets", []):
            scheme, bucket, key = parse_uri(dataset["uri"])
            if scheme != "s3":
                continue  # trainer-local data: the trainer compares the bytes
            store = self._open_cached(f"s3://{bucket}/")
            if "archive" in dataset:
                old = dataset["archive"]
                try:
                    info = self._call(lambda: store.head(old["key"]))
                except errors.NotFound:
                    changes.append(f"{old['key']}: removed")
                    continue
                if (info.size, info.etag) != (old["size"], old["etag"]):
                    changes.append(f"{old['key']}: changed (size {old['size']} → {info.size}, ETag {old['etag']} → {info.etag})")
                continue
            folder = key if not key or key.endswith("/") else key + "/"
            now = {o.key: o for o in self._call(lambda: list(store.list(folder)))}
            before = {f["key"]: f for f in dataset.get("files", [])}
            for name in sorted(set(now) | set(before)):
                if name not in now:
                    changes.append(f"{name}: removed")
                elif name not in before:
                    changes.append(f"{name}: added")
                elif (now[name].size, now[name].etag) != (before[name]["size"], before[name]["etag"]):
                    changes.append(f"{name}: changed (size {before[name]['size']} → {now[name].size}, "
                                   f"ETag {before[name]['etag']} → {now[name].etag})")
        return changes

    def _stored(self, tenant: Tenant, job_id: str) -> dict[str, Any]:
        """spec.json, and metadata.json / dataset-manifest.json when the job published them."""
        _, status = self.get_with_status(tenant, job_id)
        spec = json.loads(self._call(lambda: self.store.job_dir(tenant.name, job_id).get_bytes(SPEC_KEY)))
        docs: dict[str, Any] = {"spec": spec, "metadata": None, "manifest": None}
        outputs = {o.name: o.uri for o in (status.outputs if status else [])}
        folder = next(iter(outputs.values()), "").rsplit("/", 1)[0]
        for field, name in (("metadata", METADATA_NAME), ("manifest", DATASET_MANIFEST_NAME)):
            uri = outputs.get(name) or (f"{folder}/{name}" if folder else None)
            if uri is None or not tenant.allows("output", uri):
                continue
            scheme, bucket, key = parse_uri(uri)
            store = self._open_cached(f"s3://{bucket}/") if scheme == "s3" else self._opener(uri.rsplit("/", 1)[0])
            try:
                docs[field] = json.loads(self._call(lambda: store.get_bytes(key if scheme == "s3" else name)))
                docs[f"{field}_uri"] = uri
            except (errors.NotFound, ValueError):
                pass
        return docs

    def logs(self, tenant: Tenant, job_id: str, tail: int) -> str:
        """The last `tail` lines: the launcher's (fresh) while the job is active, else the log the
        trainer uploaded to logs/trainer.log, else whatever the launcher still has."""
        tail = max(1, min(tail, MAX_LOG_LINES))
        record, _ = self.get_with_status(tenant, job_id)
        active = record.final_phase is None
        if active:
            text = self._launcher_logs(tenant, record, tail)
            if text:
                return text
        try:
            data = self._call(lambda: self.store.job_dir(tenant.name, job_id).get_bytes(LOG_KEY))
        except errors.NotFound:
            return "" if active else self._launcher_logs(tenant, record, tail)
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-tail:]) + ("\n" if lines else "")

    def _launcher_logs(self, tenant: Tenant, record: JobRecord, tail: int) -> str:
        if self.launcher is None or record.attempt == 0:
            return ""
        try:
            return self.launcher.logs(tenant.name, record.job_id, record.attempt, tail)
        except Exception:  # noqa: BLE001 — a launcher hiccup leaves the stored log as the answer
            return ""

    # -- uploads --------------------------------------------------------------------------------
    def uploads(self, tenant: Tenant, body: UploadCreate) -> UploadGrant:
        if len(body.files) > self.settings.upload_max_files:
            raise errors.BadRequest(f"files: at most {self.settings.upload_max_files} per request; send several requests")
        if not self.store.root.root_uri.startswith("s3://"):
            raise errors.BadRequest("uploads need an s3:// state root (LATHE_STATE_URI); copy the files directly")
        prefix = f"tenants/{tenant.name}/{'adapters' if body.kind == 'adapter' else 'datasets'}/{body.dataset}/"
        if body.kind == "adapter" and (len(body.files) != 1 or not body.files[0].path.endswith(".safetensors")):
            raise errors.BadRequest("files: an adapter upload is one .safetensors file")
        targets = []
        for i, f in enumerate(body.files):
            parts = f.path.split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise errors.BadRequest(f"files[{i}].path: '{f.path}' must be a relative path without '.', '..' or "
                                        "empty segments")
            key = prefix + f.path
            url = self.store.root.presign_put(key, self.settings.presign_expires_s, f.content_type)
            targets.append(UploadTarget(path=f.path, uri=self.store.root.uri(key), url=url,
                                        headers={"Content-Type": f.content_type} if f.content_type else {}))
        return UploadGrant(dataset_uri=self.store.root.uri(prefix),
                           expires_at=self.clock() + self.settings.presign_expires_s, files=targets)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        """Store access: NotFound stays distinguishable, anything else is a 503 for the client."""
        try:
            return fn()
        except NotFound as exc:
            raise errors.NotFound(str(exc)) from None
        except StorageError as exc:
            raise errors.Unavailable(f"object store: {exc}") from None


GRID_SAVE_KINDS = ("adapter_epoch", "adapter_step", "adapter")  # a job's saves a grid compares


def _adapter_refs(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, uri) of every adapter file a merge, shrink or grid job reads (grid job references already
    expanded): what the prefix check and the header check both go through."""
    refs = [(f"merge.adapters[{i}].uri", a.uri) for i, a in enumerate(spec.merge.adapters if spec.merge else [])]
    if spec.shrink.adapter is not None:
        refs.append(("shrink.adapter", spec.shrink.adapter))
    if spec.kind == "grid" and spec.grid is not None:
        refs += [(f"grid.adapters[{i}].uri", a.uri) for i, a in enumerate(spec.grid.adapters) if a.uri is not None]
    return refs
