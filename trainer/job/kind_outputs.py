"""The last step every job kind but training shares: its files, the spec it ran and metadata.json.

Training publishes through `trainer.job.train_outputs`, whose metadata also carries the sd-scripts `ss_*` summary;
the other kinds (merge, shrink, grid, caption) write the same common keys plus their own `details`.
"""

from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING, Any

import msgspec

from trainer import __version__
from trainer.job.buildinfo import git_commit, package_versions
from trainer.job.publish import LocalOutput
from trainer.core.jobkeys import CONFIG_NAME
from trainer.core.spec import encode_spec, spec_hash
from trainer.core.status import OutputFile

if TYPE_CHECKING:
    from trainer.job.train_job import Job


def publish_outputs(job: Job, kind: str, items: list[LocalOutput], details: dict[str, Any]) -> list[OutputFile]:
    """Uploads `items` and spec.json, then commits metadata.json (common keys + `details`)."""
    spec, ctx = job.spec, job.ctx
    started = time.monotonic()
    config_path = job.out_dir / CONFIG_NAME
    config_path.write_bytes(encode_spec(spec))
    for item in [*items, LocalOutput(str(config_path), CONFIG_NAME, "config")]:
        ctx.published[item.name] = job.publisher.upload(item)
    job.timings["publish_s"] = time.monotonic() - started
    metadata: dict[str, Any] = {
        "lathe_version": __version__,
        "git_commit": git_commit(),
        "kind": kind,
        "job": ctx.jobdir.uri,
        "attempt": ctx.attempt,
        "spec": msgspec.to_builtins(spec),
        "spec_sha256": spec_hash(spec),
        **details,
        "timings_s": job.timings,
        "packages": package_versions(),
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "warnings": job.reporter.status.warnings,
    }
    outputs = sorted(ctx.published.values(), key=lambda o: o.name)
    return [*outputs, job.publisher.commit(metadata, outputs)]
