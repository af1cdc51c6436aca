"""Routes that read what a job wrote (metrics, samples and report, output files) and convert pasted
specs; the web console (service/console/) draws its pages from them, and any client may use them.

Same auth and tenancy as the other job routes: service/api/app.py mounts them on the API router.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Request, get, post
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream

from service.api.wire import ProblemDetail
from service.jobs import artifacts
from service.jobs.artifacts import JobDetails, MetricsHistory
from service.jobs.convert import SpecConversion, SpecConvertRequest, convert_text
from service.tenants import Tenant

PROBLEM_JSON = "application/problem+json"
JobId = Annotated[str, Parameter(description="a job id, e.g. j-20250101t120000-0123abcd", max_length=64)]
_TEXT = {400: "Malformed request", 401: "Missing or invalid bearer token", 404: "No such job (or output) for this tenant",
         415: "The body is not sent as application/json", 422: "The text cannot be converted (field paths or flags named)",
         503: "Object store unavailable; retry"}


def _responses(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(ProblemDetail, description=_TEXT[c], media_type=PROBLEM_JSON, generate_examples=False)
            for c in codes}


def _job_read(path: str, summary: str) -> get:
    """The GET route decorator every read of a job's artifacts shares (one tenant's job, read on a worker thread)."""
    return get(path, sync_to_thread=True, summary=summary, responses=_responses(400, 401, 404, 503))


def _jobs(request: Request):  # noqa: ANN202 — service.api.app.Services.jobs (imported lazily: app imports us)
    return request.app.state.services.jobs


@_job_read("/v1/jobs/{job_id:str}/metrics",
           "Per-step training history (step, epoch, loss, learning rate, time) from metrics.jsonl")
def job_metrics(request: Request, tenant: Tenant, job_id: JobId) -> MetricsHistory:
    return artifacts.metrics(_jobs(request), tenant, job_id)


@_job_read("/v1/jobs/{job_id:str}/details",
           "The job's spec, metadata summary (model, network, dataset, hashes, versions), sample images "
           "by step and prompt, grid images, plots and shrink report")
def job_details(request: Request, tenant: Tenant, job_id: JobId) -> JobDetails:
    return artifacts.details(_jobs(request), tenant, job_id)


@_job_read("/v1/jobs/{job_id:str}/files/{name:path}",
           "Download one output file the job lists (streamed through the API; on s3:// roots the job's "
           "outputs also carry presigned URLs)")
def job_file(request: Request, tenant: Tenant, job_id: JobId, name: str) -> Stream:
    chunks, size, media = artifacts.open_output(_jobs(request), tenant, job_id, name)
    filename = name.rsplit("/", 1)[-1].replace('"', "")
    inline = media.startswith("image/")
    headers = {
        "Content-Type": media, "Content-Length": str(size), "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=60",
        # Outputs are the tenant's own files; never let one run as a page of this origin.
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": f'{"inline" if inline else "attachment"}; filename="{filename}"',
    }
    return Stream(chunks, media_type=media, headers=headers)


@post("/v1/specs:convert", sync_to_thread=True, status_code=200,
      summary="Convert pasted text (a spec as JSON/TOML, or an sd-scripts command line / config) to a spec "
              "object; files named in the text are never read on the server",
      responses=_responses(400, 401, 415, 422))
def convert_spec(data: SpecConvertRequest, tenant: Tenant) -> SpecConversion:
    return convert_text(data)


ROUTES = [job_metrics, job_details, job_file, convert_spec]
