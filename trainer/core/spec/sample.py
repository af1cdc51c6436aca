"""The `sample` section: images rendered during training, and a grid over the job's saves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
from msgspec import Meta

from trainer.core.spec.common import PositiveInt, Sampler, Text, _Base
from trainer.core.spec.problems import Found, Problem
from trainer.core.spec.prompts import prompt_problems

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

GridAxis = Literal["saves", "weight", "seed"]


class GridAxesSpec(_Base):
    """The two axes of a comparison grid (prompts are the third: one PNG per prompt), A1111's XYZ plot:
    `saves` (one column/row per adapter), `weight` (the adapter's multiplier), `seed`."""

    x: GridAxis = "saves"
    y: GridAxis = "weight"
    weights: Annotated[list[Annotated[float, Meta(ge=-10.0, le=10.0)]], Meta(min_length=1, max_length=16)] = msgspec.field(default_factory=lambda: [1.0])
    seeds: Annotated[list[Annotated[int, Meta(ge=0, lt=2**32)]], Meta(max_length=16)] = []  # [] → the prompt's --d


class SampleSpec(_Base):
    """Sample images during training: `--sample_prompts`, `--sample_every_n_*`, `--sample_sampler`."""

    # "prompt --n neg --w 512 --h 512 --d 1 --l 7 --s 20"
    prompts: Annotated[list[Text], Meta(max_length=1000)] = []
    sampler: Sampler = "ddim"
    every_n_steps: PositiveInt | None = None
    every_n_epochs: PositiveInt | None = None
    at_first: bool = False  # also before the first step
    grid: GridAxesSpec | None = None  # at the end, a grid over this job's saves (see GridAxesSpec)


def check_sample(spec: JobSpec) -> list[Problem]:
    out = Found(prompt_problems("sample.prompts", spec.sample.prompts))
    if spec.sample.prompts and not (spec.sample.every_n_steps or spec.sample.every_n_epochs or spec.sample.at_first):
        out.warn("sample.prompts", "no sample.every_n_steps / every_n_epochs / at_first: only final samples are made")
    return out
