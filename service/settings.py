"""Service settings: one typed, documented field per knob, read from `LATHE_<FIELD>` variables
(parsed by trainer/core/envsettings.py, as the trainer's own settings are).

`Settings.from_env(os.environ)` is called once by the CLI; the app factory takes the object as an
argument (nothing is cached at import time, so tests build their own). docs/api.md lists every
variable; keep the comments here and that table in step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from trainer.core.images import MAX_IMAGE_PIXELS
from trainer.core.envsettings import SettingsError, convert_settings, read_env

ENV_PREFIX = "LATHE_"
# Variable names differing from LATHE_<FIELD> (kept short where users type them often).
_ENV_NAMES = {"trainer_cache_dir": "LATHE_LOCAL_CACHE_DIR"}

PositiveFloat = Annotated[float, Meta(gt=0)]
PositiveInt = Annotated[int, Meta(ge=1)]


class Settings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Root of the service's state (the system of record), e.g. s3://lathe-state/ or s3://bucket/lathe/.
    # Every tenant's jobs live under <state_uri>/tenants/<tenant>/.
    state_uri: Annotated[str, Meta(min_length=1)]
    # Tenants, token hashes, allowed URI prefixes and limits (JSON or TOML; format in docs/api.md).
    tokens_file: str | None = None
    # Which launcher runs trainers: local subprocesses, Kubernetes Jobs (LATHE_K8S_* settings), or
    # none (an API-only replica that never launches; another replica's reconciler does).
    launcher: Literal["local", "kubernetes", "none"] = "local"
    # Address `lathe serve` listens on.
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    # Jobs running at once across the deployment (the rest wait in `queued`); 0 = no limit
    # (a Kubernetes cluster queues itself, e.g. with Kueue).
    max_running_jobs: Annotated[int, Meta(ge=0)] = 1
    # How often the reconciler launches queued jobs, checks running ones and starts new attempts; 0 disables it
    # (an API-only replica).
    reconcile_interval_s: Annotated[float, Meta(ge=0)] = 2.0
    # A running job whose status.json heartbeat is older than this while its launcher no longer
    # knows the attempt is lost (retried when attempts remain).
    heartbeat_timeout_s: PositiveFloat = 120.0
    # Pause before the next attempt after a retryable failure: this × 2^(attempt-1), at most 5 minutes.
    retry_backoff_s: Annotated[float, Meta(ge=0)] = 5.0
    # After a cancel request, how long the trainer has to checkpoint and exit before it is killed.
    cancel_grace_s: Annotated[float, Meta(ge=0)] = 60.0
    # Lifetime of presigned GET (results) and PUT (uploads) URLs.
    presign_expires_s: Annotated[int, Meta(ge=60, le=7 * 86400)] = 3600
    # Finished jobs older than this are deleted with their outputs by the reconciler; 0 = keep forever.
    retention_s: Annotated[float, Meta(ge=0)] = 0.0
    # Page sizes of GET /v1/jobs.
    page_size_default: Annotated[int, Meta(ge=1, le=1000)] = 20
    page_size_max: Annotated[int, Meta(ge=1, le=1000)] = 100
    # Preflight: the most dataset files listed, parallel header reads, and bytes read per image header.
    preflight_max_files: PositiveInt = 20000
    preflight_workers: Annotated[int, Meta(ge=1, le=256)] = 16
    preflight_header_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024
    # Largest image the trainer accepts (pixels); larger ones fail the preflight, as they would fail the run.
    max_image_pixels: PositiveInt = MAX_IMAGE_PIXELS
    # Files of one POST /v1/uploads request.
    upload_max_files: PositiveInt = 1000
    # Largest request body (bytes); larger ones get 413 before they are parsed. Specs are a few KB;
    # datasets go straight to the object store through POST /v1/uploads.
    max_request_bytes: Annotated[int, Meta(ge=64 * 1024, le=100 * 1024 * 1024)] = 1024 * 1024
    # LocalLauncher: folder of per-attempt run records (pid, exit code, log). Relative paths are
    # relative to the working directory of the service.
    local_dir: str = ".lathe/local"
    # LocalLauncher: the trainer command; the spec URI is appended (JSON list). Default:
    # [<this python>, "-m", "trainer", "run"].
    trainer_command: list[str] | None = None
    # LocalLauncher: LATHE_CACHE_DIR of the trainers it starts (the node-local model cache).
    trainer_cache_dir: str = ".lathe/cache"
    # Standard Webhooks signing secret ("whsec_" + base64); webhooks are sent unsigned without it.
    webhook_secret: str | None = None
    # Also send a webhook on every phase change (terminal states are always sent).
    webhook_phase_changes: bool = False
    # Delivery attempts per webhook and the timeout of each (connect, send and response each get it).
    webhook_max_attempts: Annotated[int, Meta(ge=1, le=20)] = 6
    webhook_timeout_s: PositiveFloat = 10.0
    # Wait after failed attempt n: this × 4^(n-1), at most an hour (5 s, 20 s, 80 s, 320 s, 21 min).
    webhook_retry_base_s: Annotated[float, Meta(ge=0)] = 5.0
    # Receiving servers delivered to at once (each drained by one worker at a time).
    webhook_workers: Annotated[int, Meta(ge=1, le=256)] = 16
    # Send webhooks to loopback/private addresses too (development only: otherwise refused, so
    # a tenant cannot make the service call internal endpoints).
    webhook_allow_private: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `LATHE_*` variables (empty = unset); `overrides` win (used by `lathe dev` and tests)."""
        values = read_env(cls, os.environ if environ is None else environ, env_name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "state_uri" not in values:
            raise SettingsError("LATHE_STATE_URI", "required: the object-store root of the service's state, "
                                "e.g. s3://lathe-state/")
        return convert_settings(cls, values, env_name)

    def trainer_argv(self, python: str) -> list[str]:
        return list(self.trainer_command) if self.trainer_command else [python, "-m", "trainer", "run"]


def env_name(field: str) -> str:
    return _ENV_NAMES.get(field, ENV_PREFIX + field.upper())
