"""The trainer's settings: one typed field per `LATHE_<FIELD>` variable, read once per process.

Every trainer module takes these values from `trainer_settings()`, never from os.environ, and
nothing reads them at import time. The launchers set them (service/launchers/local.py,
service/launchers/k8s/manifests.py, the Dockerfile); docs/deploy.md lists them. The object-store
variables (AWS_* and the LATHE_* ones trainer/core/storage.py reads) belong to that module;
RANK / WORLD_SIZE come from torchrun.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from trainer.core.envsettings import load_settings
from trainer.core.images import MAX_IMAGE_PIXELS

ENV_PREFIX = "LATHE_"
GiB = 1024**3

PositiveInt = Annotated[int, Meta(ge=1)]


class TrainerSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    cache_dir: str | None = None
    """LATHE_CACHE_DIR: the node-local cache kept between jobs (base models, latents, shrink norms).
    Unset: ~/.cache/lathe, and latents go to the attempt's work folder."""
    work_dir: str | None = None
    """LATHE_WORK_DIR: the attempt's scratch folder (dataset, checkpoints, logs). Unset: a temp folder."""
    job_attempt: PositiveInt = 1
    """LATHE_JOB_ATTEMPT: which attempt of the job this process runs (the launcher counts them)."""
    git_commit: str | None = None
    """LATHE_GIT_COMMIT: the commit recorded in the provenance (images have no .git). Unset: read
    from the checkout's .git, if any."""
    max_dataset_bytes: PositiveInt = 50 * GiB
    """LATHE_MAX_DATASET_BYTES: the largest dataset fetched (bytes, archives unpacked included)."""
    max_dataset_files: PositiveInt = 200_000
    """LATHE_MAX_DATASET_FILES: the most files a dataset (or an unpacked archive) may hold."""
    max_image_pixels: PositiveInt = MAX_IMAGE_PIXELS
    """LATHE_MAX_IMAGE_PIXELS: the largest image accepted (pixels); the service's preflight reads
    the same variable, so both refuse the same images."""
    tokenizers_dir: str | None = None
    """LATHE_TOKENIZERS_DIR: tokenizers for single-file checkpoints, under `<dir>/<arch>/`, when the
    model has no diffusers tokenizer folder (the hub is offline in a job)."""
    shrink_workers: Annotated[int, Meta(ge=0)] = 0
    """LATHE_SHRINK_WORKERS: threads of the shrink phase (at most 8); 0 = one per usable core."""
    transfer_workers: PositiveInt = 16
    """LATHE_TRANSFER_WORKERS: objects in flight when a dataset or model folder is downloaded from a
    local folder, or from S3 without awscrt (the CRT sizes its own connection pool)."""
    exit_dir: str | None = None
    """LATHE_EXIT_DIR: set by `trainer launch` for its ranks: each writes its exit code there."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TrainerSettings:
        """The settings from `LATHE_*` variables (empty = unset); SettingsError names a bad one."""
        return load_settings(cls, environ, env_name)

    def model_cache(self) -> Path:
        """The node-local cache folder: LATHE_CACHE_DIR, else ~/.cache/lathe."""
        return Path(self.cache_dir) if self.cache_dir else Path.home() / ".cache" / "lathe"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


@functools.cache
def trainer_settings() -> TrainerSettings:
    """This process's settings, read from the environment on first use (tests that change a
    variable call `trainer_settings.cache_clear()`)."""
    return TrainerSettings.from_env(os.environ)
