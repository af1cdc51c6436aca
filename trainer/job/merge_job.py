"""A `kind = "merge"` job: fetch the base and the adapters, merge, publish the checkpoint.

Phases: preparing (fetch) → merging → uploading → succeeded. It shares the attempt's status reporter,
publisher and failure handling with training (`trainer.job.run`, `Job` in `trainer.job.train_job`);
nothing is checkpointed, a new attempt merges again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING


from trainer.core.failures import JobFailure
from trainer.job.kind_outputs import publish_outputs
from trainer.job.publish import LocalOutput
from trainer.core.status import OutputFile

if TYPE_CHECKING:
    from trainer.job.train_job import Job


def run_merge(job: Job) -> list[OutputFile]:
    from trainer.job.fetch import ensure_model, fetch_model
    from trainer.models.merge import MergeInput, merge_checkpoint
    from trainer.job.provenance import base_model_sha256

    spec, ctx = job.spec, job.ctx
    resolve = ctx.jobdir.resolve_input
    assert spec.merge is not None  # checked with the spec
    t0 = time.monotonic()
    base = ensure_model(resolve(spec.model.uri), str(ctx.cache_dir))
    job.model_downloaded = base.downloaded
    inputs = []
    for i, adapter in enumerate(spec.merge.adapters):
        try:
            path = fetch_model(resolve(adapter.uri), str(ctx.cache_dir))
        except JobFailure as exc:
            raise JobFailure(exc.reason, f"merge.adapters[{i}].uri: {exc.message}") from None
        inputs.append(MergeInput(path, adapter.ratio, label=adapter.uri))
    job.timings["fetch_s"] = time.monotonic() - t0

    job.reporter.set_phase("merging")
    name = spec.save.output_name
    single = Path(base.path).is_file()
    out = job.out_dir / (f"{name}.safetensors" if single else name)
    report = merge_checkpoint(base.path, inputs, str(out), arch=spec.model.arch,
                              v_parameterization=spec.model.v_parameterization,
                              save_precision=spec.merge.save_precision, title=spec.save.title,
                              base_label=spec.model.uri)
    job.timings["merge_s"] = report.seconds

    job.reporter.set_phase("uploading")
    if single:
        items = [LocalOutput(str(out), out.name, "checkpoint")]
    else:
        items = [LocalOutput(str(p), f"{name}/{p.relative_to(out).as_posix()}", "checkpoint")
                 for p in sorted(out.rglob("*")) if p.is_file()]
    return publish_outputs(job, "merge", items, {
        "base_model_sha256": base_model_sha256(base.path, str(ctx.cache_dir)),
        "merge": {"form": report.form, "layers": report.layers, "changed_tensors": report.changed_tensors,
                  **report.parts},
        "model_cache": "download" if job.model_downloaded else "hit",
    })

