"""The `save` section: outputs, intermediate saves, checkpoints and modelspec metadata."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.precision import Precision
from trainer.core.spec.common import PositiveInt, Uri, _Base
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec


class SaveSpec(_Base):
    output_uri: Uri | None = None  # default: <job dir>/output/
    output_name: Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^/\\\x00]+$")] = "last"
    save_precision: Precision | None = None  # None: the trained dtype (fp32)
    save_model_as: Literal["safetensors"] = "safetensors"
    save_every_n_epochs: PositiveInt | None = None
    save_every_n_steps: PositiveInt | None = None
    save_last_n_epochs: PositiveInt | None = None
    save_last_n_steps: PositiveInt | None = None  # keep saves of the last N steps
    training_comment: Annotated[str, Meta(max_length=4000)] | None = None
    checkpoint_every_n_steps: PositiveInt | None = 500  # resumable state (Lathe; --save_state)
    keep_checkpoints: PositiveInt = 2
    keep_failed_outputs: bool = False
    # modelspec metadata
    title: Annotated[str, Meta(max_length=500)] | None = None
    author: Annotated[str, Meta(max_length=500)] | None = None
    description: Annotated[str, Meta(max_length=4000)] | None = None
    license: Annotated[str, Meta(max_length=500)] | None = None
    tags: Annotated[str, Meta(max_length=2000)] | None = None


def check_save(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, sv = out.err, out.warn, spec.save
    if sv.save_last_n_epochs and not sv.save_every_n_epochs:
        err("save.save_last_n_epochs", "needs save.save_every_n_epochs")
    if sv.save_last_n_steps and not sv.save_every_n_steps:
        err("save.save_last_n_steps", "needs save.save_every_n_steps")
    if sv.save_precision == "fp16":
        warn("save.save_precision", "fp16 can underflow small weights to zero; the run reports all-zero tensors")
    return out
