"""A `kind = "grid"` job: fetch the base and the adapters, render the grid, publish it.

Phases: preparing (fetch) → rendering → uploading → succeeded. `grid.adapters` entries that name a
job have been expanded by the service at submit into that job's saves (each entry then has both
`job` and `uri`); the trainer reads URIs only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from trainer.core.failures import JobFailure, Reason
from trainer.job.context import cuda_available
from trainer.job.kind_outputs import publish_outputs
from trainer.job.publish import LocalOutput
from trainer.core.spec import adapter_label
from trainer.core.status import OutputFile

if TYPE_CHECKING:
    from trainer.job.train_job import Job


def run_grid(job: Job) -> list[OutputFile]:
    import torch

    from trainer.job.fetch import ensure_model, fetch_model
    from trainer.sampling.grid import Axes, GridAdapter, render_grid
    from trainer.models.load import load_model
    from trainer.job.provenance import base_model_sha256

    spec, ctx = job.spec, job.ctx
    resolve = ctx.jobdir.resolve_input
    grid = spec.grid
    assert grid is not None  # checked with the spec
    t0 = time.monotonic()
    base = ensure_model(resolve(spec.model.uri), str(ctx.cache_dir))
    vae = ensure_model(resolve(spec.model.vae), str(ctx.cache_dir)).path if spec.model.vae else None
    job.model_downloaded = base.downloaded
    adapters = []
    for i, entry in enumerate(grid.adapters):
        if entry.uri is None:
            raise JobFailure(Reason.SPEC_INVALID, f"grid.adapters[{i}]: job {entry.job} was not expanded into its "
                             "saves; submit through the service, or give the adapter file as uri")
        try:
            path = fetch_model(resolve(entry.uri), str(ctx.cache_dir))
        except JobFailure as exc:
            raise JobFailure(exc.reason, f"grid.adapters[{i}].uri: {exc.message}") from None
        adapters.append(GridAdapter(path, entry.label or adapter_label(entry.uri), entry.uri))
    job.timings["fetch_s"] = time.monotonic() - t0

    job.reporter.set_phase("rendering")
    t1 = time.monotonic()
    cuda = cuda_available()
    dtype = torch.float16 if cuda and spec.precision.mixed_precision == "fp16" else (
        torch.bfloat16 if cuda and spec.precision.mixed_precision == "bf16" else torch.float32)
    model_spec = msgspec.structs.replace(spec.model, uri=base.path, vae=vae)
    vae_dtype = torch.float32 if (spec.model.no_half_vae or dtype == torch.float32) else dtype
    parts = load_model(model_spec, weight_dtype=dtype, vae_dtype=vae_dtype, device="cuda" if cuda else "cpu")
    axes = Axes(grid.x, grid.y, list(grid.weights), list(grid.seeds))
    folder = job.out_dir / "grid"
    record = render_grid(parts, adapters, grid.prompts, axes, grid.sampler, str(folder),
                         clip_skip=spec.model.clip_skip, base_seed=ctx.seed(spec))
    job.timings["render_s"] = time.monotonic() - t1

    job.reporter.set_phase("uploading")
    items = grid_outputs(folder)
    return publish_outputs(job, "grid", items, {
        "base_model_sha256": base_model_sha256(base.path, str(ctx.cache_dir)),
        "grid": {"cells": sum(len(p["cells"]) for p in record["prompts"]), "x": record["x"], "y": record["y"]},
        "model_cache": "download" if job.model_downloaded else "hit",
    })


def render_own_grid(job: Job) -> list[LocalOutput]:
    """`sample.grid` of a training job: its saves still kept plus the final file × the weights (and
    seeds), on the model it trained on with its own adapter unhooked. A failure here is a warning:
    the trained adapter is published all the same."""
    import logging

    from trainer.job.fetch import fetch_model
    from trainer.sampling.grid import Axes, GridAdapter, render_grid

    spec, ctx, g = job.spec, job.ctx, job.spec.sample.grid
    assert g is not None
    t0 = time.monotonic()
    job.reporter.set_phase("rendering")
    try:
        saves = sorted((o for o in ctx.published.values() if o.kind in ("adapter_epoch", "adapter_step", "adapter")),
                       key=lambda o: (o.kind == "adapter", o.name))
        adapters = []
        for o in saves:
            local = job.out_dir / o.name  # an earlier attempt's save is fetched from the outputs
            path = str(local) if local.is_file() else fetch_model(o.uri, str(ctx.cache_dir))
            adapters.append(GridAdapter(path, adapter_label(o.name), o.name))
        if job.network is not None:
            job.network.restore()  # the grid applies each save itself
        folder = job.out_dir / "grid"
        render_grid(job.parts, adapters, spec.sample.prompts, Axes(g.x, g.y, list(g.weights), list(g.seeds)),
                    spec.sample.sampler, str(folder), clip_skip=spec.model.clip_skip,
                    base_seed=ctx.seed(spec))
        items = grid_outputs(folder)
    except Exception as exc:  # noqa: BLE001 — the grid is optional: never lose the trained adapter to it
        message = f"sample.grid skipped: {type(exc).__name__}: {exc}"
        logging.getLogger("lathe.grid").warning(message)
        job.reporter.warn(message)
        items = []
    job.timings["grid_s"] = time.monotonic() - t0
    job.reporter.set_phase("uploading")
    return items


def grid_outputs(folder: Path) -> list[LocalOutput]:
    """The grid folder as outputs under `grid/`: grid PNGs and grid.json ("grid"), cells ("sample")."""
    items = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            items.append(LocalOutput(str(p), f"grid/{rel}", "sample" if rel.startswith("cells/") else "grid"))
    return items
