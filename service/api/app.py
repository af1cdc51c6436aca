"""The app factory: routes, auth, error mapping, OpenAPI and the reconciler, wired in one place.

`create_app(settings)` builds everything from a Settings object (tests pass their own). Handlers are
thin: take the tenant the auth middleware found, call JobService, return a wire Struct. Every ServiceError becomes an RFC 9457
problem+json response here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Litestar, Request, Response, Router, delete, get, post
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, OpenAPIMediaType, Operation, Reference, RequestBody, SecurityScheme
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from service.api import artifact_routes, errors
from service.console import routes as console_routes
from service.api.conformance import JsonRequest, MethodRules
from service.jobs.convert import SpecConvertRequest
from service.jobs.jobdiff import JobDiff
from service.jobs.operations import JobService
from service.state.jobstore import JobStore
from service.launchers.base import Launcher
from service.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.api.metrics import Metrics
from service.state.outbox import Outbox, WebhookDispatcher
from service.reconcile.phase import effective
from service.reconcile.reconciler import Reconciler
from service.settings import Settings
from service.tenants import Tenant, TenantRegistry
from service.reconcile.webhooks import WebhookSender
from service.api.wire import (
    DatasetReport, DatasetReportRequest, Health, JobCreate, JobCreateDoc, JobList, JobView, ProblemDetail, UploadCreate,
    UploadGrant, ValidationResult,
)
from trainer.core.status import TERMINAL_PHASES, Phase
from trainer.core.storage import StorageError, open_store

log = logging.getLogger("lathe.service")

API_VERSION = "1.0.0"
PROBLEM_JSON = "application/problem+json"
SSE_KEEPALIVE_S = 15.0


@dataclass
class Services:
    """What the handlers use; one per app (tests build several apps side by side)."""

    settings: Settings
    jobs: JobService
    tenants: TenantRegistry
    metrics: Metrics
    store: JobStore
    reconciler: Reconciler | None = None
    webhooks: WebhookDispatcher | None = None
    events_poll_s: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- errors


def _problem(status: int, type_: str, title: str, detail: str, instance: str | None = None,
             headers: dict[str, str] | None = None, **extra: Any) -> Response[bytes]:
    body = ProblemDetail(type=f"https://lathe.dev/problems/{type_}", title=title, status=status, detail=detail,
                         instance=instance, **{k: v for k, v in extra.items() if k in ("problems", "limit", "preflight")})
    headers = {**(headers or {}), **({"WWW-Authenticate": 'Bearer realm="lathe"'} if status == 401 else {})}
    return Response(msgspec.json.encode(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _service_error(request: Request, exc: errors.ServiceError) -> Response[bytes]:
    return _problem(exc.status, exc.type_, exc.title, exc.detail, request.url.path, **exc.extra)


def _http_error(request: Request, exc: HTTPException) -> Response[bytes]:
    detail = exc.detail
    extra = getattr(exc, "extra", None)
    if exc.status_code == 400 and extra:
        if isinstance(extra, list):
            extra = [_with_wire_name(request, item) for item in extra]
        detail = f"{detail}: {msgspec.json.encode(extra).decode()}"
    titles = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 413: "Request body too large"}
    return _problem(exc.status_code, "http-" + str(exc.status_code), titles.get(exc.status_code, "HTTP error"),
                    detail, request.url.path, headers=exc.headers)


def _with_wire_name(request: Request, item: Any) -> Any:
    """A parameter problem names the header or query key the client sent (`Idempotency-Key`), not the
    handler's argument (`idempotency_key`)."""
    if not isinstance(item, dict) or item.get("source") not in ("header", "query", "cookie"):
        return item
    try:
        kwarg = request.route_handler.parsed_fn_signature.parameters[item["key"]].kwarg_definition
    except (KeyError, AttributeError):
        return item
    name = getattr(kwarg, item["source"], None)
    return {**item, "key": name} if isinstance(name, str) and name else item


def _recursion_error(request: Request, exc: RecursionError) -> Response[bytes]:
    # msgspec gives up on JSON nested ~1000 levels deep with a RecursionError while decoding the body,
    # before any handler runs: that is the client's malformed request, not a failure of the service.
    if "deserializing" in str(exc):
        return _problem(400, "http-400", "Bad request", "the JSON body is nested too deeply to be a job request",
                        request.url.path)
    return _internal_error(request, exc)


def _internal_error(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _problem(500, "internal", "Internal error", "the service failed; the error was logged", request.url.path)


def _responses(*codes: int) -> dict[int, ResponseSpec]:
    text = {400: "Malformed request", 401: "Missing or invalid bearer token", 404: "No such job for this tenant",
            409: "Conflict (idempotency key reused with another body, or the job is not finished)",
            415: "The body is not sent as application/json (or application/*+json)",
            422: "Invalid spec, URI outside the tenant's prefixes, or failed dataset preflight (field paths)",
            429: "A tenant limit was reached (the `limit` member names it)",
            503: "Object store or launcher unavailable; retry"}
    return {c: ResponseSpec(ProblemDetail, description=text[c], media_type=PROBLEM_JSON, generate_examples=False)
            for c in codes}


# ------------------------------------------------------------------------------------------ auth


class _TenantAuth(AbstractAuthenticationMiddleware):
    """The bearer token, checked before anything reads the request body: a request without a valid
    token gets 401 whatever its body holds. OPTIONS is open (service.api.conformance answers it)."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        services: Services = connection.app.state.services
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthorized("send 'Authorization: Bearer <token>' (the CLI reads LATHE_TOKEN)")
        tenant = services.tenants.authenticate(token.strip())
        if tenant is None:
            raise errors.Unauthorized("the bearer token is not valid")
        return AuthenticationResult(user=tenant, auth=None)


def _provide_tenant(request: Request) -> Tenant:
    return request.user


def _services(request: Request) -> Services:
    return request.app.state.services


# -------------------------------------------------------------------------------------- OpenAPI


@dataclass
class _SpecBodyOperation(Operation):
    """Documents the request body with the full JobSpec schema (the handler decodes `spec` itself so
    that every spec problem comes back as a 422 with its field path)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, description="The job spec (JSON form of spec.toml) and an optional webhook URL; "
                                        "spec.kind: train, merge, shrink or caption (docs/spec.md)",
            content={"application/json": OpenAPIMediaType(schema=Reference(ref="#/components/schemas/JobCreateDoc"))},
        )


def _doc_components() -> dict[str, Any]:
    """msgspec's JSON schemas of the request bodies (JobCreateDoc and the JobSpec tree, UploadCreate), as
    OpenAPI components: msgspec decodes these bodies, so its schemas say exactly what is accepted
    (`additionalProperties: false` wherever unknown fields are refused)."""
    _, components = msgspec.json.schema_components([JobCreateDoc, JobCreate, UploadCreate, DatasetReportRequest,
                                                    SpecConvertRequest],
                                                   ref_template="#/components/schemas/{name}")
    return components


# ---------------------------------------------------------------------------------------- routes

JobId = Annotated[str, Parameter(description="a job id, e.g. j-20250101t120000-0123abcd", max_length=64)]


@post("/v1/jobs", sync_to_thread=True, status_code=201, operation_class=_SpecBodyOperation, summary="Submit a job",
      responses={200: ResponseSpec(JobView, description="Replay: the job an earlier request with the same "
                                   "Idempotency-Key and body created", generate_examples=False),
                 **_responses(400, 401, 409, 415, 422, 429, 503)})
def submit_job(
    request: Request, data: JobCreate, tenant: Tenant,
    idempotency_key: Annotated[str | None, Parameter(header="Idempotency-Key", min_length=1, max_length=255,
                                                     required=False)] = None,
) -> Response[JobView]:
    services = _services(request)
    view, created = services.jobs.submit(tenant, data, idempotency_key)
    if created:
        services.metrics.jobs_submitted.inc()
    return Response(view, status_code=201 if created else 200, headers={"Location": f"/v1/jobs/{view.id}"})


@post("/v1/jobs:validate", sync_to_thread=True, status_code=200, operation_class=_SpecBodyOperation, summary="Validate a job without launching",
      responses=_responses(400, 401, 415, 422, 429, 503))
def validate_job(request: Request, data: JobCreate, tenant: Tenant,
                 preflight: Annotated[bool, Parameter(description="false: the spec checks only, without the "
                                                      "dataset preflight (fast; for checks as a user types)")] = True,
                 ) -> ValidationResult:
    return _services(request).jobs.validate(tenant, data, preflight)


@dataclass
class _ReportBodyOperation(Operation):
    """Documents the body of POST /v1/datasets:report (decoded by the service so that a bad field is a
    422 naming it)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, description="The dataset URI and the settings a training job would read it with",
            content={"application/json": OpenAPIMediaType(
                schema=Reference(ref="#/components/schemas/DatasetReportRequest"))},
        )


@post("/v1/datasets:report", sync_to_thread=True, status_code=200, operation_class=_ReportBodyOperation,
      summary="Report what a dataset holds: concepts, sizes and buckets, tags, uncaptioned images, duplicates",
      responses=_responses(400, 401, 415, 422, 503))
def dataset_report_post(request: Request, data: dict[str, Any], tenant: Tenant) -> DatasetReport:
    return _services(request).jobs.dataset_report(tenant, data)


@get("/v1/datasets/report", sync_to_thread=True,
     summary="The dataset report for a URI (query: the body fields of POST /v1/datasets:report)",
     responses=_responses(400, 401, 422, 503))
def dataset_report_get(
    request: Request, tenant: Tenant,
    uri: Annotated[str, Parameter(description="the dataset: a folder or a .zip/.tar", max_length=2048)],
    resolution: Annotated[int | None, Parameter(description="square training resolution")] = None,
    caption_extension: Annotated[str | None, Parameter(max_length=64)] = None,
    enable_bucket: bool | None = None,
    subject: Annotated[str | None, Parameter(description="character or style", max_length=16)] = None,
    epochs: int | None = None,
    duplicates: bool | None = None,
) -> DatasetReport:
    query = {"uri": uri, "resolution": resolution, "caption_extension": caption_extension,
             "enable_bucket": enable_bucket, "subject": subject, "epochs": epochs, "duplicates": duplicates}
    return _services(request).jobs.dataset_report(tenant, {k: v for k, v in query.items() if v is not None})


@get("/v1/jobs", sync_to_thread=True, summary="List jobs, newest first", responses=_responses(400, 401, 503))
def list_jobs(
    request: Request, tenant: Tenant,
    cursor: Annotated[str | None, Parameter(description="next_cursor of the previous page", min_length=1,
                                            max_length=64)] = None,
    limit: Annotated[int | None, Parameter(ge=1, le=1000, description="page size")] = None,
    status: Annotated[Phase | None, Parameter(description="only jobs in this phase")] = None,
) -> JobList:
    return _services(request).jobs.list(tenant, cursor=cursor, limit=limit, phase=status)


@get("/v1/jobs/{job_id:str}", sync_to_thread=True, summary="A job: phase, progress, error and results",
     responses=_responses(400, 401, 404, 503))
def get_job(request: Request, tenant: Tenant, job_id: JobId) -> JobView:
    return _services(request).jobs.get(tenant, job_id)


@post("/v1/jobs/{job_id:str}/cancel", sync_to_thread=True, status_code=202, summary="Cancel a job (the trainer checkpoints, then stops)",
      responses=_responses(400, 401, 404, 503))
def cancel_job(request: Request, tenant: Tenant, job_id: JobId) -> JobView:
    return _services(request).jobs.cancel(tenant, job_id)


@delete("/v1/jobs/{job_id:str}", sync_to_thread=True, status_code=204, summary="Delete a finished job and its outputs",
        responses=_responses(400, 401, 404, 409, 503))
def delete_job(request: Request, tenant: Tenant, job_id: JobId) -> None:
    _services(request).jobs.delete(tenant, job_id)


@get("/v1/jobs/{job_id:str}/logs", sync_to_thread=True, media_type="text/plain", summary="The last lines of the trainer's log",
     responses=_responses(400, 401, 404, 503))
def job_logs(request: Request, tenant: Tenant, job_id: JobId,
             tail: Annotated[int, Parameter(ge=1, le=10000, description="lines")] = 200) -> str:
    return _services(request).jobs.logs(tenant, job_id, tail)


@get("/v1/jobs/{job_id:str}/diff/{other_id:str}", sync_to_thread=True,
     summary="What differs between two jobs: spec fields, dataset files, model, versions, final loss",
     responses=_responses(400, 401, 404, 503))
def diff_jobs(request: Request, tenant: Tenant, job_id: JobId, other_id: JobId) -> JobDiff:
    return _services(request).jobs.diff(tenant, job_id, other_id)


class RerunRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    force: bool = False  # run even when the dataset changed since the job ran


@post("/v1/jobs/{job_id:str}/rerun", sync_to_thread=True, status_code=201,
      summary="Submit a job's spec again against the same inputs (refused when its dataset changed)",
      responses=_responses(400, 401, 404, 409, 415, 422, 429, 503))
def rerun_job(request: Request, tenant: Tenant, job_id: JobId, data: RerunRequest) -> Response[JobView]:
    view, _ = _services(request).jobs.rerun(tenant, job_id, data.force)
    return Response(view, status_code=201, headers={"Location": f"/v1/jobs/{view.id}"})


class JobEvent(msgspec.Struct, kw_only=True):
    id: str
    phase: str
    revision: int
    attempt: int
    progress: Any
    error: Any = None


@get("/v1/jobs/{job_id:str}/events", media_type="text/event-stream",
     summary="Server-Sent Events: phase changes and progress (resume with Last-Event-ID)",
     responses=_responses(400, 401, 404, 503))
async def job_events(
    request: Request, tenant: Tenant, job_id: JobId,
    last_event_id: Annotated[str | None, Parameter(header="Last-Event-ID", max_length=32, required=False)] = None,
) -> ServerSentEvent:
    services = _services(request)
    jobs = services.jobs
    await anyio.to_thread.run_sync(jobs.get_with_status, tenant, job_id)  # 404 before the stream starts
    try:
        resume_after = int(last_event_id) if last_event_id else -1
    except ValueError:
        resume_after = -1
    return ServerSentEvent(_event_stream(jobs, tenant, job_id, resume_after, services.events_poll_s),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(jobs: JobService, tenant: Tenant, job_id: str, resume_after: int,
                        poll_s: float) -> AsyncIterator[ServerSentEventMessage]:
    """One event per new status revision ("progress") or phase ("phase"); event id = revision. On
    resume, revisions up to Last-Event-ID are skipped, but a terminal phase is always sent: the
    stream ends with it."""
    sent: tuple[int, str] | None = None
    last_phase: str | None = None
    last_sent_at = time.monotonic()
    while True:
        try:
            record, status = await anyio.to_thread.run_sync(jobs.get_with_status, tenant, job_id)
        except errors.NotFound:
            return  # deleted while streaming
        except errors.Unavailable:
            await anyio.sleep(poll_s * 2)
            continue
        eff = effective(record, status)
        revision = status.revision if status is not None else 0
        key = (revision, eff.phase)
        terminal = eff.phase in TERMINAL_PHASES
        if key != sent and (revision > resume_after or terminal or (sent is not None and eff.phase != last_phase)):
            event = JobEvent(id=job_id, phase=eff.phase, revision=revision, attempt=record.attempt,
                             progress=status.progress if status is not None else None, error=eff.error)
            kind = "phase" if eff.phase != last_phase else "progress"
            yield ServerSentEventMessage(data=msgspec.json.encode(event).decode(), event=kind, id=revision)
            sent, last_phase, last_sent_at = key, eff.phase, time.monotonic()
        elif sent is None:
            sent, last_phase = key, eff.phase  # resumed: nothing new yet
        if terminal:
            return
        if time.monotonic() - last_sent_at > SSE_KEEPALIVE_S:
            yield ServerSentEventMessage(comment="keep-alive")
            last_sent_at = time.monotonic()
        await anyio.sleep(poll_s)


@post("/v1/uploads", sync_to_thread=True, status_code=201, summary="Presigned PUT URLs to send a dataset without S3 credentials",
      responses=_responses(400, 401, 415, 503))
def create_upload(request: Request, data: UploadCreate, tenant: Tenant) -> UploadGrant:
    return _services(request).jobs.uploads(tenant, data)


@get("/healthz", sync_to_thread=False, summary="Liveness", include_in_schema=True)
def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", sync_to_thread=True, summary="Readiness: the object store answers",
     responses={503: ResponseSpec(Health, description="Not ready", generate_examples=False)})
def readyz(request: Request) -> Response[Health]:
    store = _services(request).store
    try:
        list(store.root.list("tenants/", limit=1))
    except StorageError as exc:
        return Response(Health(status="unavailable", detail=f"object store: {exc}"), status_code=503)
    return Response(Health(status="ok"))


@get("/metrics", sync_to_thread=True, media_type=METRICS_CONTENT_TYPE, summary="Prometheus metrics", include_in_schema=True)
def metrics(request: Request) -> Response[bytes]:
    return Response(_services(request).metrics.render(), media_type=METRICS_CONTENT_TYPE)


# ------------------------------------------------------------------------------------ middleware


def _metrics_middleware(app: Callable) -> Callable:
    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope["method"]
        status = 500

        async def send_with_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_with_status)
        finally:
            handler = scope.get("route_handler")
            route = next(iter(handler.paths)) if handler is not None and handler.paths else "unmatched"
            services: Services = scope["litestar_app"].state.services
            services.metrics.requests.labels(method, route, str(status)).inc()
            services.metrics.request_seconds.labels(method, route).observe(time.perf_counter() - start)

    return middleware


# ------------------------------------------------------------------------------------------ app


def build_launcher(settings: Settings, store: JobStore) -> Launcher | None:
    if settings.launcher == "none":
        return None
    if settings.launcher == "local":
        from service.launchers.local import LocalLauncher

        return LocalLauncher(settings.local_dir, settings.trainer_argv(sys.executable),
                             cache_dir=settings.trainer_cache_dir)
    from service.launchers.k8s.launcher import KubernetesLauncher
    from service.launchers.k8s.settings import KubernetesSettings

    return KubernetesLauncher(KubernetesSettings.from_env(os.environ),
                              status_reader=lambda tenant, job_id: store.read_status(tenant, job_id))


def create_app(settings: Settings, *, tenants: TenantRegistry | None = None, launcher: Launcher | None = None,
               use_settings_launcher: bool = True, events_poll_s: float = 1.0, debug: bool = False) -> Litestar:
    """The API app. `tenants` defaults to LATHE_TOKENS_FILE's; `launcher` to the one the settings
    name (pass `use_settings_launcher=False` with no launcher for an API-only app)."""
    services = _build_services(settings, tenants, launcher, use_settings_launcher, events_poll_s)
    reconciler, webhooks = services.reconciler, services.webhooks

    def on_startup(app: Litestar) -> None:
        if reconciler is not None and settings.reconcile_interval_s > 0:
            reconciler.start()
            webhooks.start()  # delivers where the reconciler runs: API-only replicas stay passive

    def on_shutdown(app: Litestar) -> None:
        if reconciler is not None:
            reconciler.stop()
        webhooks.stop()

    app = Litestar(
        route_handlers=[_api_router(), healthz, readyz, metrics, *console_routes.ROUTES],
        openapi_config=_openapi_config(),
        exception_handlers={errors.ServiceError: _service_error, HTTPException: _http_error,
                            RecursionError: _recursion_error, Exception: _internal_error},
        on_startup=[on_startup], on_shutdown=[on_shutdown],
        request_max_body_size=settings.max_request_bytes,
        request_class=JsonRequest,
        debug=debug,
    )
    app.state.services = services
    # In front of routing: the metrics count every answer (404, 405 and 401 included), and HEAD, OPTIONS
    # and `Allow` follow one rule for every path.
    app.asgi_handler = _metrics_middleware(MethodRules(app.asgi_handler, app))
    _publish_doc_schemas(app)
    return app


def _build_services(settings: Settings, tenants: TenantRegistry | None, launcher: Launcher | None,
                    use_settings_launcher: bool, events_poll_s: float) -> Services:
    """The job store, tenants, launcher, webhooks and reconciler the handlers and background threads share."""
    store = JobStore(open_store(settings.state_uri))
    if tenants is None:
        if not settings.tokens_file:
            raise errors.BadRequest("LATHE_TOKENS_FILE is not set: the service needs tenants (see docs/api.md)")
        tenants = TenantRegistry.from_file(settings.tokens_file, settings.state_uri)
    if launcher is None and use_settings_launcher:
        launcher = build_launcher(settings, store)
    metrics_ = Metrics()
    sender = WebhookSender(secret=settings.webhook_secret, timeout_s=settings.webhook_timeout_s,
                           allow_private=settings.webhook_allow_private)
    webhooks = WebhookDispatcher(Outbox(store.root), sender, max_attempts=settings.webhook_max_attempts,
                                 retry_base_s=settings.webhook_retry_base_s, workers=settings.webhook_workers,
                                 poll_s=settings.reconcile_interval_s or 2.0, metrics=metrics_)
    jobs = JobService(settings, store, launcher=launcher)
    reconciler = (Reconciler(settings, store, tenants, launcher, metrics=metrics_, webhooks=webhooks)
                  if launcher is not None else None)
    return Services(settings=settings, jobs=jobs, tenants=tenants, metrics=metrics_, store=store,
                    reconciler=reconciler, webhooks=webhooks, events_poll_s=events_poll_s,
                    extra={"launcher": launcher})


def _api_router() -> Router:
    """The tenant's routes, behind bearer-token auth (OPTIONS aside: it answers without a token)."""
    return Router(
        path="/", route_handlers=[submit_job, validate_job, list_jobs, get_job, cancel_job, delete_job, job_logs,
                                  diff_jobs, rerun_job, job_events, create_upload, dataset_report_post,
                                  dataset_report_get, *artifact_routes.ROUTES],
        dependencies={"tenant": Provide(_provide_tenant, sync_to_thread=False)},
        middleware=[DefineMiddleware(_TenantAuth, exclude_http_methods=["OPTIONS"])],
        security=[{"bearer": []}], tags=["jobs"],
    )


def _openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Lathe", version=API_VERSION, path="/schema",
        description="LoRA/LyCORIS training as a service. Errors are RFC 9457 problem+json documents.",
        components=Components(
            schemas=_doc_components(),  # type: ignore[arg-type]  (plain JSON Schema dicts render as they are)
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer",
                                                       description="a tenant's API token")},
        ),
        render_plugins=[SwaggerRenderPlugin(path="/"), JsonRenderPlugin(path="/openapi.json")],
    )


def _publish_doc_schemas(app: Litestar) -> None:
    """Litestar replaces `components.schemas` with the ones it generates, dropping JobCreateDoc and the
    JobSpec tree our request bodies refer to: build the document once and put msgspec's schemas of the
    request bodies in (they win over litestar's where both name a Struct)."""
    document = app.openapi_schema  # built once and cached: what /schema/openapi.json serves
    document.components.schemas = {**(document.components.schemas or {}), **_doc_components()}
