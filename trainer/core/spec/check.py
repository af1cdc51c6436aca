"""`check_spec`: the cross-field rules, one checker per section, run after the types are valid."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.core.spec.dataset import check_dataset
from trainer.core.spec.kinds import check_kind
from trainer.core.spec.model import check_model
from trainer.core.spec.network import check_network
from trainer.core.spec.optimizer import check_optimizer, check_scheduler
from trainer.core.spec.problems import Problem
from trainer.core.spec.resources import check_resources
from trainer.core.spec.sample import check_sample
from trainer.core.spec.save import check_save
from trainer.core.spec.shrink import check_shrink
from trainer.core.spec.training import (
    check_caching,
    check_noise,
    check_precision,
    check_training,
)

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

# The order problems are reported in (a checker for each section; caching spans precision and dataset).
_TRAIN_CHECKS = (check_caching, check_scheduler, check_network, check_optimizer, check_noise, check_model,
                 check_precision, check_dataset, check_training, check_save, check_shrink, check_sample,
                 check_resources)


def check_spec(spec: JobSpec) -> list[Problem]:
    """Incompatible combinations (errors) and questionable ones (warnings), with what to do."""
    kind_problems = check_kind(spec)
    if kind_problems or spec.kind != "train":
        return kind_problems
    out: list[Problem] = []
    for check in _TRAIN_CHECKS:
        out += check(spec)
    return out


def warnings_for(spec: JobSpec) -> list[Problem]:
    return [p for p in check_spec(spec) if p.severity == "warning"]
