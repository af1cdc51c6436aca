"""The service's one error hierarchy. Domain code raises these; the app maps them to RFC 9457
problem+json exactly once (service/api/app.py), so no module below the handlers knows about HTTP.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: `status` is the HTTP status the app answers with, `type_` the problem type slug."""

    status = 500
    type_ = "internal"
    title = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra  # extension members of the problem document (e.g. problems, limit)


class BadRequest(ServiceError):
    status, type_, title = 400, "bad-request", "Bad request"


class Unauthorized(ServiceError):
    status, type_, title = 401, "unauthorized", "Missing or invalid bearer token"


class NotFound(ServiceError):
    """Also what another tenant's job looks like: existence is never disclosed across tenants."""

    status, type_, title = 404, "not-found", "Not found"


class UnsupportedMediaType(ServiceError):
    status, type_, title = 415, "unsupported-media-type", "The request body is not sent as JSON"


class Conflict(ServiceError):
    status, type_, title = 409, "conflict", "Conflict"


class DatasetChanged(ServiceError):
    """A rerun whose dataset no longer matches the job it repeats (keys, sizes, ETags)."""

    status, type_, title = 409, "dataset-changed", "The dataset changed since the job ran"


class InvalidSpec(ServiceError):
    """The spec or the dataset preflight failed; `problems` carry field paths."""

    status, type_, title = 422, "invalid-spec", "The job spec is invalid"


class PreflightFailed(ServiceError):
    status, type_, title = 422, "preflight-failed", "The dataset preflight found problems that would fail the run"


class Forbidden(ServiceError):
    """A URI outside the tenant's allowed prefixes: reported as 422 with the field path (a spec problem)."""

    status, type_, title = 422, "uri-not-allowed", "A URI in the spec is outside the tenant's allowed prefixes"


class LimitExceeded(ServiceError):
    """A tenant limit; `limit` names it (max_concurrent_jobs, max_gpus_per_job, max_runtime_s)."""

    status, type_, title = 429, "limit-exceeded", "A tenant limit was reached"


class Unavailable(ServiceError):
    """The object store or the launcher cannot be reached; the client may retry."""

    status, type_, title = 503, "unavailable", "A backing service is unavailable"
