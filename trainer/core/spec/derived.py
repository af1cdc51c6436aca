"""Values derived from a spec: the run's length, warmup, and which models are trained."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.core.spec.common import DEFAULT_MAX_TRAIN_STEPS

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec


def total_steps(spec: JobSpec, steps_per_epoch: int) -> int:
    """Optimizer updates for the run: epochs win over steps; 1600 when neither is given (sd-scripts)."""
    if spec.training.max_train_epochs is not None:
        return spec.training.max_train_epochs * max(1, steps_per_epoch)
    return spec.training.max_train_steps or DEFAULT_MAX_TRAIN_STEPS


def warmup_steps(spec: JobSpec, total: int) -> int:
    w = spec.scheduler.warmup_steps
    return int(round(w * total)) if 0 < w < 1 else int(w)


def train_text_encoder(spec: JobSpec) -> bool:
    """Whether the text encoder(s) are trained (sd-scripts: unless --network_train_unet_only)."""
    return not spec.network.train_unet_only


def train_unet(spec: JobSpec) -> bool:
    return not spec.network.train_text_encoder_only
