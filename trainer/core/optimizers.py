"""The optimizers of `optimizer.type`: the class each name builds and the keyword arguments it takes.

Torch-free: the spec check (run by the service at submit and `:validate`, and by the trainer when it
reads the spec) refuses an `optimizer.args` key from this table, and `trainer.train.optim` builds the
optimizer from it. A test compares every entry with the installed class's constructor, and pyproject
pins the packages that provide them with `~=`, so the service and the trainer image agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OptimizerClass:
    module: str  # where the class lives, e.g. "torch.optim"
    name: str  # the class, e.g. "AdamW"
    args: tuple[str, ...]  # its constructor's keyword arguments, except `params` and `lr`
    # Arguments Lathe sets itself that users may not override (the optimizer's identity depends on them).
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def user_args(self) -> list[str]:
        return [a for a in self.args if a not in self.fixed]


_ADAMW_8BIT = ("betas", "eps", "weight_decay", "amsgrad", "optim_bits", "args", "min_8bit_size", "is_paged")
_NESTEROV = {"nesterov": True}

OPTIMIZERS: dict[str, OptimizerClass] = {
    "AdamW": OptimizerClass("torch.optim", "AdamW", (
        "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused")),
    "AdamW8bit": OptimizerClass("bitsandbytes.optim", "AdamW8bit", _ADAMW_8BIT),
    "Lion": OptimizerClass("lion_pytorch", "Lion", ("betas", "weight_decay", "use_triton", "decoupled_weight_decay")),
    "Lion8bit": OptimizerClass("bitsandbytes.optim", "Lion8bit", (
        "betas", "weight_decay", "args", "min_8bit_size", "is_paged")),
    "Prodigy": OptimizerClass("prodigyopt", "Prodigy", (
        "betas", "beta3", "eps", "weight_decay", "decouple", "use_bias_correction", "safeguard_warmup", "d0",
        "d_coef", "growth_rate", "fsdp_in_use", "slice_p")),
    "DAdaptAdam": OptimizerClass("dadaptation", "DAdaptAdam", (
        "betas", "eps", "weight_decay", "log_every", "decouple", "use_bias_correction", "d0", "growth_rate",
        "fsdp_in_use")),
    "Adafactor": OptimizerClass("transformers.optimization", "Adafactor", (
        "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter", "relative_step",
        "warmup_init")),
    "SGDNesterov": OptimizerClass("torch.optim", "SGD", (
        "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused"),
        fixed=_NESTEROV),
    "SGDNesterov8bit": OptimizerClass("bitsandbytes.optim", "SGD8bit", (
        "momentum", "dampening", "weight_decay", "nesterov", "args", "min_8bit_size"), fixed=_NESTEROV),
}


def unknown_arg_message(kind: str, key: str) -> str | None:
    """Why `key` cannot be in `optimizer.args` for `optimizer.type = kind`, or None when it can."""
    allowed = OPTIMIZERS[kind].user_args
    if key in allowed:
        return None
    if key in OPTIMIZERS[kind].fixed:
        return f"'{key}' is set by {kind} itself and cannot be changed"
    return f"'{key}' is not an argument of {kind}; it takes: {', '.join(sorted(allowed)) or '(none)'}"


def adafactor_relative_step(args: Mapping[str, Any]) -> bool:
    """Whether Adafactor schedules its own LR: sd-scripts' default `relative_step = True`, which
    `warmup_init = True` also implies."""
    return bool(args.get("relative_step", True)) or bool(args.get("warmup_init", False))
