"""JobSpec: the whole document, one field per section."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from trainer.core.spec.caption import CaptionSpec
from trainer.core.spec.common import SpecVersion, _Base
from trainer.core.spec.dataset import DatasetSpec
from trainer.core.spec.grid import GridSpec
from trainer.core.spec.kinds import JobKind, MergeSpec
from trainer.core.spec.model import ModelSpec
from trainer.core.spec.network import NetworkSpec
from trainer.core.spec.optimizer import OptimizerSpec, SchedulerSpec
from trainer.core.spec.resources import LoggingSpec, ResourcesSpec
from trainer.core.spec.sample import SampleSpec
from trainer.core.spec.save import SaveSpec
from trainer.core.spec.shrink import ShrinkSpec
from trainer.core.spec.training import NoiseSpec, PrecisionSpec, TrainingSpec


class JobSpec(_Base):
    """A whole job. `version` is required so that a future v2 is never misread as v1. `kind` says
    what the job does: "train" (the default) trains an adapter on `dataset`; "merge" needs no
    dataset and reads the `merge` section; "shrink" reduces `shrink.adapter` against `model.uri`;
    "caption" writes a captioned copy of `dataset.uri` (`caption` section; `model.uri` is the tagger,
    none: tag operations only)."""

    version: SpecVersion
    model: ModelSpec | None = None  # required for every kind but "caption"
    kind: JobKind = "train"
    dataset: DatasetSpec | None = None  # required for kind "train"
    merge: MergeSpec | None = None  # required for kind "merge"
    caption: CaptionSpec | None = None  # required for kind "caption"
    grid: GridSpec | None = None  # required for kind "grid"
    name: Annotated[str, Meta(max_length=200)] | None = None
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)
    optimizer: OptimizerSpec = msgspec.field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = msgspec.field(default_factory=SchedulerSpec)
    training: TrainingSpec = msgspec.field(default_factory=TrainingSpec)
    noise: NoiseSpec = msgspec.field(default_factory=NoiseSpec)
    precision: PrecisionSpec = msgspec.field(default_factory=PrecisionSpec)
    save: SaveSpec = msgspec.field(default_factory=SaveSpec)
    shrink: ShrinkSpec = msgspec.field(default_factory=ShrinkSpec)
    sample: SampleSpec = msgspec.field(default_factory=SampleSpec)
    resources: ResourcesSpec = msgspec.field(default_factory=ResourcesSpec)
    logging: LoggingSpec = msgspec.field(default_factory=LoggingSpec)
