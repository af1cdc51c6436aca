"""kind = "grid": the `grid` section (prompts over adapters × weights × seeds) and the grid checks,
which also cover a training job's `sample.grid`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

from msgspec import Meta

from trainer.core.spec.common import Sampler, Text, Uri, _Base
from trainer.core.spec.problems import Problem
from trainer.core.spec.prompts import prompt_problems
from trainer.core.spec.sample import GridAxesSpec

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec


class GridAdapterSpec(_Base):
    """One adapter input of a grid: a finished job's saves (`job`, expanded by the service at submit into
    the saves still kept plus the final file) or one adapter file (`uri`)."""

    uri: Uri | None = None
    job: Annotated[str, Meta(max_length=64, pattern=r"^j-[0-9]{8}t[0-9]{6}-[0-9a-f]{8}$")] | None = None
    label: Annotated[str, Meta(max_length=200)] | None = None  # the axis label (default: the file name)


class GridSpec(GridAxesSpec):
    """kind = "grid": render prompts over adapters × weights × seeds on `model.uri`."""

    adapters: Annotated[list[GridAdapterSpec], Meta(min_length=1, max_length=64)] = []
    prompts: Annotated[list[Text], Meta(min_length=1, max_length=16)] = []  # kohya prompt syntax, as sample.prompts
    sampler: Sampler = "ddim"


def adapter_label(uri: str) -> str:
    """An axis label from a file name: `name-000002.safetensors` → `name-000002`."""
    base = os.path.basename(uri.rstrip("/"))
    return base.removesuffix(".safetensors")


def check_grid(spec: JobSpec) -> list[Problem]:
    problems = []
    if spec.kind != "grid":
        if spec.grid is not None:
            problems.append(Problem("grid", "only for kind \"grid\" (a training job renders its own grid with "
                                    "sample.grid)"))
    elif spec.grid is None:
        problems.append(Problem("grid", "required for kind \"grid\": give grid.adapters, grid.prompts and the axes"))
    sample_grid = spec.sample.grid
    if sample_grid is not None and spec.kind != "train":
        problems.append(Problem("sample.grid", "only for kind \"train\"; a \"grid\" job takes the grid section"))
    if sample_grid is not None and "saves" not in (sample_grid.x, sample_grid.y):
        problems.append(Problem("sample.grid", "a training job's grid is over its saves: set x or y to \"saves\""))
    if sample_grid is not None and not spec.sample.prompts:
        problems.append(Problem("sample.grid", "needs sample.prompts: the grid renders them over the saves"))
    for where, g in (("grid", spec.grid if spec.kind == "grid" else None), ("sample.grid", sample_grid)):
        if g is None:
            continue
        if g.x == g.y:
            problems.append(Problem(f"{where}.y", f"is the same axis as {where}.x ({g.x!r}); pick two of "
                                    "saves, weight, seed"))
        if "seed" in (g.x, g.y) and not g.seeds:
            problems.append(Problem(f"{where}.seeds", "required when seed is an axis: give the seeds to compare"))
        if "weight" not in (g.x, g.y) and len(g.weights) != 1:
            problems.append(Problem(f"{where}.weights", "several weights but weight is not an axis; set x or y to "
                                    "\"weight\" or give one weight"))
        if "seed" not in (g.x, g.y) and len(g.seeds) > 1:
            problems.append(Problem(f"{where}.seeds", "several seeds but seed is not an axis; set x or y to "
                                    "\"seed\" or give one seed"))
    g = spec.grid if spec.kind == "grid" else None
    if g is not None:
        problems += _grid_section_problems(g)
    return problems


def _grid_section_problems(g: GridSpec) -> list[Problem]:
    problems = []
    if not g.adapters:
        problems.append(Problem("grid.adapters", "required: the finished jobs ({job = ID}) or adapter files "
                                "({uri = …}) to compare"))
    if not g.prompts:
        problems.append(Problem("grid.prompts", "required: one or more prompts in the sample.prompts syntax"))
    for i, a in enumerate(g.adapters):
        # Both at once is the form the service stores (and the reconciler and trainer read back): a job
        # expanded into its saves, each with its URI; the URI is then what is rendered.
        if a.uri is None and a.job is None:
            problems.append(Problem(f"grid.adapters[{i}]", "give uri (an adapter file) or job (a finished "
                                    "job's id)"))
    if "saves" not in (g.x, g.y) and len(g.adapters) != 1:
        problems.append(Problem("grid.adapters", "several adapters but saves is not an axis; set x or y to "
                                "\"saves\" or give one adapter"))
    return problems + prompt_problems("grid.prompts", g.prompts)
