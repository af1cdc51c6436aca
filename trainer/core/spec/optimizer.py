"""The `optimizer` and `scheduler` sections, and how they pair."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.optimizers import adafactor_relative_step, unknown_arg_message
from trainer.core.spec.common import (
    Fraction,
    NonNegInt,
    OptionValue,
    PositiveInt,
    _Base,
)
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

OptimizerType = Literal[
    "AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "DAdaptAdam", "Adafactor", "SGDNesterov",
    "SGDNesterov8bit",
]
SchedulerType = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "adafactor", "cosine_annealing_warm_restarts",
]


class OptimizerSpec(_Base):
    """`--optimizer_type`, `--optimizer_args`, learning rates and stabilisers."""

    type: OptimizerType = "AdamW"
    # e.g. {"weight_decay": 0.01, "decouple": true}
    args: Annotated[dict[Annotated[str, Meta(max_length=100)], OptionValue], Meta(max_length=100)] = {}
    learning_rate: Annotated[float, Meta(ge=0.0)] = 2e-6  # sd-scripts' default; LoRA runs use ~1e-4
    unet_lr: Annotated[float, Meta(ge=0.0)] | None = None
    text_encoder_lr: Annotated[float, Meta(ge=0.0)] | Annotated[
        list[Annotated[float, Meta(ge=0.0)]], Meta(min_length=1, max_length=2)
    ] | None = None  # one value, or [te1, te2] for SDXL
    max_grad_norm: Annotated[float, Meta(ge=0.0)] = 1.0  # 0 disables clipping
    scale_weight_norms: Annotated[float, Meta(gt=0.0)] | None = None


class SchedulerSpec(_Base):
    """`--lr_scheduler`, warmup, cycles, power; plus a built-in cosine-with-warm-restarts schedule."""

    type: SchedulerType = "constant"
    warmup_steps: Annotated[float, Meta(ge=0.0)] = 0  # ≥ 1: steps; 0 < x < 1: ratio of total steps
    num_cycles: PositiveInt = 1  # cosine_with_restarts: 4 ⇒ three restarts
    power: Annotated[float, Meta(gt=0.0)] = 1.0  # polynomial
    # cosine_annealing_warm_restarts (the Russian guide's custom scheduler, built in; no code by name):
    cycle_steps: PositiveInt | None = None  # T_0: steps per cycle (default: total / num_cycles)
    cycle_mult: Annotated[float, Meta(ge=1.0)] = 1.0  # each cycle this many times longer
    cycle_warmup_steps: NonNegInt = 0  # linear warmup at the start of every restart
    peak_decay: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0  # peak LR multiplier per cycle
    min_lr_ratio: Fraction = 0.0  # floor as a fraction of the peak


def check_scheduler(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, opt, sch = out.err, out.warn, spec.optimizer, spec.scheduler
    if sch.type == "adafactor" and opt.type != "Adafactor":
        err("scheduler.type", "the 'adafactor' scheduler only works with optimizer.type = 'Adafactor'; "
            "choose another scheduler or the Adafactor optimizer")
    if sch.type in ("constant", "adafactor") and sch.warmup_steps:
        # sd-scripts raises "does not require num_warmup_steps" for these two.
        err("scheduler.warmup_steps", f"the '{sch.type}' scheduler has no warmup (sd-scripts refuses it); set it to 0 "
            "or use 'constant_with_warmup'")
    if sch.type != "cosine_annealing_warm_restarts" and (sch.cycle_steps or sch.cycle_warmup_steps):
        warn("scheduler.cycle_steps", "only used by scheduler.type = 'cosine_annealing_warm_restarts'")
    return out


def check_optimizer(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, opt, sch, arch = out.err, out.warn, spec.optimizer, spec.scheduler, spec.model.arch
    if arch == "sdxl" and isinstance(opt.text_encoder_lr, list) and len(opt.text_encoder_lr) not in (1, 2):
        err("optimizer.text_encoder_lr", "SDXL takes one value or two ([te1, te2])")
    if arch != "sdxl" and isinstance(opt.text_encoder_lr, list) and len(opt.text_encoder_lr) != 1:
        err("optimizer.text_encoder_lr", f"{arch} has one text encoder: give one value")

    # Optimizer arguments: the names each class takes (the trainer builds the optimizer from the same table).
    for key in opt.args:
        problem = unknown_arg_message(opt.type, key)
        if problem is not None:
            err(f"optimizer.args.{key}", problem)
    # The polynomial schedule decays to 1e-7 (diffusers' lr_end); Adafactor with relative_step uses its own.
    if (sch.type == "polynomial" and opt.learning_rate <= 1e-7
            and not (opt.type == "Adafactor" and adafactor_relative_step(opt.args))):
        err("optimizer.learning_rate", "scheduler.type 'polynomial' decays to 1e-7: optimizer.learning_rate must be "
            "above that")

    # Optimizers with their own schedule / LR conventions.
    if opt.type in ("Prodigy", "DAdaptAdam") and (opt.unet_lr or opt.learning_rate) < 0.1:
        warn("optimizer.learning_rate", f"{opt.type} adapts the step size: a learning rate around 1.0 is usual")
    return out
