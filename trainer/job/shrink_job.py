"""A `kind = "shrink"` job: the shrink phase of training, on any adapter file the tenant may read.

Phases: preparing (fetch the adapter, and the base when the rule reads it) → shrinking → uploading →
succeeded. The rank rules are the training job's (`shrink` section, trainer/shrink/). A file that is
not an adapter, or does not fit the base, fails the job with `adapter_mismatch`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from trainer.core.failures import JobFailure, Reason
from trainer.job.context import cuda_available
from trainer.job.kind_outputs import publish_outputs
from trainer.job.publish import LocalOutput
from trainer.core.status import OutputFile

if TYPE_CHECKING:
    from trainer.job.train_job import Job


def run_shrink(job: Job) -> list[OutputFile]:
    from trainer.job.fetch import ensure_model, fetch_model
    from trainer.job.provenance import base_model_sha256
    from trainer.shrink import shrink_file
    from trainer.core.shrink_errors import ShrinkError

    spec, ctx, sh = job.spec, job.ctx, job.spec.shrink
    resolve = ctx.jobdir.resolve_input
    assert sh.adapter is not None  # checked with the spec
    t0 = time.monotonic()
    try:
        adapter = fetch_model(resolve(sh.adapter), str(ctx.cache_dir))
    except JobFailure as exc:
        raise JobFailure(exc.reason, f"shrink.adapter: {exc.message}") from None
    uses_base = sh.rank is None and sh.method is None
    base = ensure_model(resolve(spec.model.uri), str(ctx.cache_dir)) if uses_base else None
    job.timings["fetch_s"] = time.monotonic() - t0

    job.reporter.set_phase("shrinking")
    t1 = time.monotonic()
    name = spec.save.output_name
    out_path = str(job.out_dir / f"{name}-shrunk.safetensors")
    plot_path = str(job.out_dir / f"{name}-shrink.png") if sh.plot else None
    try:
        report = shrink_file(adapter, out_path, base=base.path if base else None, rank=sh.rank, method=sh.method,
                             param=sh.param, recipe=sh.recipe if uses_base else None, max_rank=sh.max_rank,
                             save_precision=sh.save_precision, device="cuda" if cuda_available() else "cpu",
                             plot_path=plot_path,
                             report_names={"input": sh.adapter, "output": os.path.basename(out_path),
                                           "base": spec.model.uri if uses_base else None})
    except ShrinkError as exc:
        message = str(exc).replace(adapter, sh.adapter).replace("--base ", "model.uri ")
        raise JobFailure(Reason.ADAPTER_MISMATCH, message) from None
    job.timings["shrink_s"] = time.monotonic() - t1

    job.reporter.set_phase("uploading")
    items = [LocalOutput(out_path, os.path.basename(out_path), "adapter_shrunk")]
    if plot_path and Path(plot_path).exists():
        items.append(LocalOutput(plot_path, os.path.basename(plot_path), "plot"))
    return publish_outputs(job, "shrink", items, {
        "base_model_sha256": base_model_sha256(base.path, str(ctx.cache_dir)) if base else None,
        "shrink_report": msgspec.to_builtins(report),
    })
