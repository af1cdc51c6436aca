"""A trained adapter's way out: the optional shrink phase, then uploading and metadata.json.

The kinds other than training publish through `trainer.job.kind_outputs`; a training job's
metadata.json adds the run's figures (steps, loss, seed, provenance, zero-tensor checks).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import TYPE_CHECKING, Any

import msgspec

from trainer import __version__
from trainer.train.saving import files_to_remove
from trainer.core.jobdir import with_retries
from trainer.core.jobkeys import CONFIG_NAME
from trainer.core.spec import UNSHRINKABLE_ALGOS, encode_spec, spec_hash
from trainer.core.status import OutputFile
from trainer.job.buildinfo import git_commit, package_versions
from trainer.job.context import cuda_available
from trainer.job.publish import LocalOutput

if TYPE_CHECKING:
    from trainer.job.train_job import Job

log = logging.getLogger("lathe.run")


def shrink(job: Job, result: Any, inputs: dict[str, Any]) -> tuple[list[LocalOutput], dict | None]:
    """The shrunk adapter (and its plot) and the shrink report; a failure here is a warning: the full
    adapter is published all the same."""
    spec, sh = job.spec, job.spec.shrink
    if not sh.enabled:
        return [], None
    if spec.network.algo in UNSHRINKABLE_ALGOS:  # warned about at submit (spec check)
        return [], {"skipped": True, "error": f"'{spec.network.algo}' adapters cannot be shrunk"}
    from trainer.shrink import shrink_file

    job.reporter.set_phase("shrinking")
    t0 = time.monotonic()
    name = spec.save.output_name
    out_path = str(job.out_dir / f"{name}-shrunk.safetensors")
    plot_path = str(job.out_dir / f"{name}-shrink.png") if sh.plot else None
    uses_base = sh.rank is None and sh.method is None
    try:
        report = shrink_file(result.final_path, out_path, base=inputs["model"] if uses_base else None,
                             rank=sh.rank, method=sh.method, param=sh.param,
                             recipe=None if not uses_base else sh.recipe, max_rank=sh.max_rank,
                             save_precision=sh.save_precision or spec.save.save_precision,
                             device="cuda" if cuda_available() else "cpu", plot_path=plot_path,
                             report_names={"input": f"{name}.safetensors", "output": os.path.basename(out_path),
                                           "base": spec.model.uri if uses_base else None})
    except Exception as exc:  # noqa: BLE001 — shrinking is optional: never lose the trained adapter to it
        job.timings["shrink_s"] = time.monotonic() - t0
        message = f"shrink skipped, the full adapter is published: {type(exc).__name__}: {exc}"
        log.warning(message)
        job.reporter.warn(message)
        return [], {"skipped": True, "error": f"{type(exc).__name__}: {exc}"}
    job.timings["shrink_s"] = time.monotonic() - t0
    items = [LocalOutput(out_path, os.path.basename(out_path), "adapter_shrunk")]
    if plot_path and os.path.exists(plot_path):
        items.append(LocalOutput(plot_path, os.path.basename(plot_path), "plot"))
    return items, msgspec.to_builtins(report)


def publish(job: Job, result: Any, shrink_items: list[LocalOutput], shrink_report: dict | None) -> list[OutputFile]:
    """Upload the final adapter, the shrunk one, spec.json, the dataset manifest and the grid; prune
    intermediate saves beyond save_last_n_*; commit metadata.json last."""
    job.reporter.set_phase("uploading")
    t0 = time.monotonic()
    spec, ctx = job.spec, job.ctx
    name = spec.save.output_name
    items = [LocalOutput(result.final_path, f"{name}.safetensors", "adapter"), *shrink_items]
    for item in items:
        if item.kind.startswith("adapter"):
            job.check_zeros(item.path, item.name)
    config_path = job.out_dir / CONFIG_NAME
    config_path.write_bytes(encode_spec(spec))
    items.append(LocalOutput(str(config_path), CONFIG_NAME, "config"))
    if job.manifest_path is not None:
        items.append(LocalOutput(str(job.manifest_path), job.manifest_path.name, "manifest"))
    for item in items:
        ctx.published[item.name] = job.publisher.upload(item)
    # sd-scripts' keep-last-N across all attempts' intermediate saves.
    stale = files_to_remove(list(ctx.published), name, keep_epochs=spec.save.save_last_n_epochs,
                            keep_steps=spec.save.save_last_n_steps)
    for old in stale:
        with_retries(lambda o=old: ctx.out.delete(o), what=f"removing old save {old}")
        ctx.published.pop(old, None)
    if spec.sample.grid is not None:
        from trainer.job.grid_job import render_own_grid

        for item in render_own_grid(job):
            ctx.published[item.name] = job.publisher.upload(item)
    job.timings["publish_s"] = time.monotonic() - t0
    metadata = training_metadata(job, result, shrink_report)
    outputs = sorted(ctx.published.values(), key=lambda o: o.name)
    return [*outputs, job.publisher.commit(metadata, outputs)]


def training_metadata(job: Job, result: Any, shrink_report: dict | None) -> dict[str, Any]:
    """metadata.json of a training job, less `outputs` (the publisher adds them)."""
    from trainer.models.adapter_file import read_metadata

    spec, ctx = job.spec, job.ctx
    return {
        "lathe_version": __version__,
        "git_commit": git_commit(),
        "job": ctx.jobdir.uri,
        "attempt": ctx.attempt,
        "spec": msgspec.to_builtins(spec),
        "spec_sha256": spec_hash(spec),
        "seed": ctx.seed(spec),
        "base_model_sha256": job.base_model_sha256,
        "dataset_manifest_sha256": job.manifest_sha256,
        "steps": result.steps_done,
        "epochs": result.epochs_done,
        "loss": {"final_avg": result.avg_loss, "history_len": len(result.loss_history),
                 "first": result.loss_history[:1], "last": result.loss_history[-1:]},
        "header": read_metadata(result.final_path),
        "shrink_report": shrink_report,
        "zero_tensors": job.zero_checks,
        "timings_s": job.timings,
        "model_cache": "download" if job.model_downloaded else "hit",
        "packages": package_versions(),
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "warnings": job.reporter.status.warnings,
    }
