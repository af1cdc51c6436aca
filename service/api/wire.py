"""Wire types of API v1 (msgspec Structs): what clients send (`*Create`) apart from what they get back.

Field names here are the public contract (docs/api.md); the stored records (job.json) live in
service/state/jobstore.py and status.json in trainer/core/status.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from trainer.core.dataset.report import DatasetReport  # noqa: F401 (re-exported: the report's wire form)
from trainer.core.spec import JobSpec, Reso, ShortText, Uri
from trainer.core.status import ErrorInfo, Phase, Progress

# ------------------------------------------------------------------------------------------ input


class JobCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/jobs and POST /v1/jobs:validate. `spec` is decoded by trainer.core.spec so that
    every problem comes back with its field path (422), not as a generic body error."""

    spec: dict[str, Any]
    # Called on terminal states (and phase changes when the deployment enables them), signed per
    # the Standard Webhooks spec.
    webhook_url: Annotated[str, Meta(max_length=2048, pattern=r"^https?://")] | None = None


class DatasetReportRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/datasets:report (and the query of GET /v1/datasets/report): a dataset and the
    settings a training job would read it with (the spec's `dataset.*` names and defaults)."""

    uri: Uri  # folder of `<repeats>_<concept>` subfolders, or a .zip/.tar archive of one
    resolution: Reso | Annotated[list[Reso], Meta(min_length=2, max_length=2)] = 512
    caption_extension: ShortText = ".caption"
    enable_bucket: bool = False
    min_bucket_reso: Reso = 256
    max_bucket_reso: Reso = 1024
    bucket_reso_steps: Annotated[int, Meta(ge=8, le=256)] = 64
    bucket_no_upscale: bool = False
    subject: Literal["character", "style"] | None = None  # picks the guides' size figures to warn with
    epochs: Annotated[int, Meta(ge=1, le=100000)] | None = None  # for the total image-steps
    duplicates: bool = True  # decode images for the near-duplicate check (bounded; see docs/api.md)


class JobCreateDoc(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """JobCreate as documented in OpenAPI: the spec's full schema (trainer.core.spec.JobSpec)."""

    spec: JobSpec
    webhook_url: Annotated[str, Meta(max_length=2048, pattern=r"^https?://")] | None = None


# No control characters (CR/LF/NUL…): the path becomes an object key and the content type a header
# the client must send back, so either could smuggle a header line or an unlistable key.
UploadPath = Annotated[str, Meta(min_length=1, max_length=1024, pattern=r"^[^/\\\x00-\x1f\x7f][^\\\x00-\x1f\x7f]*$")]


class UploadFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: UploadPath  # relative path inside the dataset, e.g. "10_mychar/001.png"
    content_type: Annotated[str, Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] | None = None


class UploadCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/uploads: a dataset (or adapter) name and the files to send."""

    dataset: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    files: Annotated[list[UploadFile], Meta(min_length=1)]
    # "adapter": an adapter file for a merge or shrink job, stored under tenants/<t>/adapters/<name>/
    kind: Literal["dataset", "adapter"] = "dataset"


# ----------------------------------------------------------------------------------------- output


class FieldProblem(msgspec.Struct, kw_only=True):
    path: str  # dotted field path ("network.dim") or a dataset file ("dataset:10_cat/x.png")
    message: str
    severity: Literal["error", "warning"] = "error"


class ConceptReport(msgspec.Struct, kw_only=True):
    name: str
    image_dir: str
    repeats: int
    images: int
    is_reg: bool
    without_caption: int


class BucketReport(msgspec.Struct, kw_only=True):
    width: int
    height: int
    images: int
    image_steps: int  # images × repeats
    batches: int


class PreflightReport(msgspec.Struct, kw_only=True):
    """What the dataset preflight found, from the S3 listing and image headers (no full download)."""

    dataset_uri: str
    files_listed: int
    images: int
    concepts: list[ConceptReport] = []
    unpaired_captions: list[str] = []  # first few; counts below
    unpaired_captions_count: int = 0
    unsupported_files: list[str] = []
    unsupported_files_count: int = 0
    unreadable_images: list[str] = []
    smaller_than_resolution: int = 0
    buckets: list[BucketReport] = []
    batch_size: int = 1
    image_steps_per_epoch: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0  # optimizer updates (after gradient accumulation and data parallelism)
    epochs: int = 0
    total_steps: int = 0
    checked: bool = True  # False when the dataset could not be inspected here (e.g. a compressed tar)
    problems: list[FieldProblem] = []
    warnings: list[FieldProblem] = []


class OutputView(msgspec.Struct, kw_only=True):
    name: str
    uri: str
    size: int
    sha256: str
    kind: str
    url: str | None = None  # presigned GET, valid for the deployment's presign_expires_s


class AttemptView(msgspec.Struct, kw_only=True):
    attempt: int
    launched_at: float
    ended_at: float | None = None
    reason: str | None = None
    exit_code: int | None = None


class JobView(msgspec.Struct, kw_only=True):
    id: str
    name: str | None = None
    kind: str = "train"  # the spec's `kind`: train, merge, shrink, caption, grid
    phase: Phase
    submitted_at: float
    updated_at: float
    finished_at: float | None = None
    attempt: int  # the current attempt (0 while never launched)
    max_attempts: int
    attempts: list[AttemptView] = []
    cancel_requested: bool = False
    revision: int = 0  # status.json revision (the SSE event id)
    progress: Progress = msgspec.field(default_factory=Progress)
    error: ErrorInfo | None = None
    warnings: list[str] = []
    outputs: list[OutputView] = []
    spec_uri: str
    job_uri: str
    spec_hash: str
    preflight: PreflightReport | None = None


class JobSummary(msgspec.Struct, kw_only=True):
    id: str
    name: str | None = None
    kind: str = "train"
    phase: Phase
    submitted_at: float
    updated_at: float
    finished_at: float | None = None
    attempt: int
    step: int = 0
    total_steps: int = 0
    eta_s: float | None = None  # while training: seconds left at the current speed
    loss: float | None = None  # the running average loss
    error: ErrorInfo | None = None


class JobList(msgspec.Struct, kw_only=True):
    items: list[JobSummary]
    next_cursor: str | None = None  # pass as ?cursor= for the next (older) page; None at the end


class ValidationResult(msgspec.Struct, kw_only=True):
    ok: bool
    spec_hash: str
    warnings: list[FieldProblem] = []
    preflight: PreflightReport | None = None


class UploadTarget(msgspec.Struct, kw_only=True):
    path: str
    uri: str
    url: str  # presigned PUT
    method: Literal["PUT"] = "PUT"
    headers: dict[str, str] = {}  # send these headers with the PUT (the signature covers them)


class UploadGrant(msgspec.Struct, kw_only=True):
    dataset_uri: str  # put this in spec.dataset.uri once the files are sent
    expires_at: float
    files: list[UploadTarget]


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "unavailable"]
    detail: str | None = None


class ProblemDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem document, with Lathe's extension members."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    problems: list[FieldProblem] | None = None  # field paths for 422
    limit: str | None = None  # which tenant limit for 429
    preflight: PreflightReport | None = None
