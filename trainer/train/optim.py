"""Optimizers by sd-scripts' `--optimizer_type` names, with `--optimizer_args` checked against each class.

`optimizer.args` arrive typed from the spec (sd-scripts parses `key=value` with ast.literal_eval; we get
the same Python values from JSON/TOML); lists become tuples (`betas`, Adafactor's `eps`). Which class each
name builds and which arguments it takes come from the torch-free table `trainer.core.optimizers`, which the
spec check also reads, so an argument the class does not take is refused at submit with the names it
does take, instead of a TypeError deep inside torch. The Adafactor conventions are sd-scripts': `relative_step` defaults to True, and then
the optimizer schedules its own LR (the group LRs are dropped and the `adafactor` scheduler is used).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trainer.core.failures import JobFailure, Reason
from trainer.core.optimizers import OPTIMIZERS, adafactor_relative_step, unknown_arg_message
from trainer.core.spec import OptimizerSpec

log = logging.getLogger("lathe.train")


@dataclass
class BuiltOptimizer:
    optimizer: torch.optim.Optimizer
    name: str  # "module.Class", as sd-scripts records it in ss_optimizer
    args: dict[str, Any]  # the effective keyword arguments
    # Adafactor with relative_step: the optimizer sets its own LR; the loop must use AdafactorSchedule.
    relative_step_lr: float | None = None
    group_names: list[str] = field(default_factory=list)

    @property
    def args_text(self) -> str:
        """`k=v,k=v` like sd-scripts' ss_optimizer suffix."""
        return ",".join(f"{k}={v}" for k, v in self.args.items())

    @property
    def ss_optimizer(self) -> str:
        return self.name + (f"({self.args_text})" if self.args else "")


def _bitsandbytes(kind: str) -> Any:
    try:
        import bitsandbytes as bnb  # noqa: F401
    except ImportError:
        bnb = None
    if bnb is None or not torch.cuda.is_available():
        raise JobFailure(Reason.SPEC_INVALID,
                         f"optimizer.type '{kind}' needs bitsandbytes with a CUDA device, which this trainer does not "
                         "have; use optimizer.type = 'AdamW' (or 'Lion')")
    return bnb


def _optimizer_class(kind: str) -> Callable[..., torch.optim.Optimizer]:
    entry = OPTIMIZERS.get(kind)
    if entry is None:
        raise JobFailure(Reason.SPEC_INVALID, f"optimizer.type '{kind}' is not supported")
    if entry.module.startswith("bitsandbytes"):
        _bitsandbytes(kind)
    return getattr(importlib.import_module(entry.module), entry.name)


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def optimizer_kwargs(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """Typed `optimizer.args` → keyword arguments, refusing unknown names with the accepted ones."""
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        problem = unknown_arg_message(kind, key)
        if problem is not None:
            raise JobFailure(Reason.SPEC_INVALID, f"optimizer.args: {problem}")
        kwargs[key] = _normalise(value)
    if kind.startswith("SGDNesterov") and "momentum" not in kwargs:
        kwargs["momentum"] = 0.9  # sd-scripts: Nesterov needs momentum
    if kind == "Adafactor":
        relative_step = adafactor_relative_step(kwargs)
        if relative_step and kwargs.get("relative_step") is False:
            log.info("Adafactor: warmup_init needs relative_step; setting relative_step = True (as sd-scripts)")
        kwargs["relative_step"] = relative_step
    return kwargs


def _fused_default(kind: str, kwargs: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """AdamW on CUDA is fused unless the spec chose an implementation: one kernel for all parameters and no
    host synchronisation (foreach AdamW reads each step count back). Not in `args`, so ss_optimizer is the
    same on every device."""
    chosen = {"foreach", "fused", "capturable", "differentiable"} & set(kwargs)
    first = next(iter(groups[0]["params"]), None)
    if kind != "AdamW" or chosen or first is None or first.device.type != "cuda":
        return {}
    return {"fused": True}


def build_optimizer(opt: OptimizerSpec, param_groups: list[dict[str, Any]]) -> BuiltOptimizer:
    """The optimizer for the network's parameter groups (each group carries its own `lr`)."""
    kind = opt.type
    cls = _optimizer_class(kind)
    kwargs = optimizer_kwargs(kind, dict(opt.args))
    groups = [dict(g) for g in param_groups if list(g["params"])]
    if not groups:
        raise JobFailure(Reason.SPEC_INVALID, "the network has no trainable parameters; check network.preset / "
                         "network.train_unet_only / network.train_text_encoder_only")
    names = [str(g.get("name", f"group{i}")) for i, g in enumerate(groups)]
    lr: float | None = opt.learning_rate
    relative_lr = None

    if kind in ("Prodigy", "DAdaptAdam"):
        # They adapt one step size; Prodigy refuses differing group LRs (other than 0). sd-scripts' rule:
        # the first group's LR takes effect.
        first = groups[0].get("lr", lr)
        if len({g.get("lr", lr) for g in groups if g.get("lr", lr)}) > 1:
            log.warning("%s adapts one step size: only the first learning rate takes effect (%s)", kind, first)
            for g in groups:
                if g.get("lr", lr):
                    g["lr"] = first
    if kind == "Adafactor" and kwargs["relative_step"]:
        # The optimizer computes its LR from the step count; explicit LRs are ignored (sd-scripts).
        relative_lr = opt.learning_rate
        for g in groups:
            g.pop("lr", None)
        lr = None
    kwargs_all = {**kwargs, **OPTIMIZERS[kind].fixed, **_fused_default(kind, kwargs, groups)}
    try:
        optimizer = cls(groups, lr=lr, **kwargs_all)
    except (TypeError, ValueError) as exc:
        raise JobFailure(Reason.SPEC_INVALID, f"optimizer.args rejected by {kind}: {exc}") from None
    name = f"{cls.__module__}.{cls.__name__}"
    return BuiltOptimizer(optimizer, name, kwargs, relative_step_lr=relative_lr, group_names=names)


def current_lrs(built: BuiltOptimizer, scheduler: Any | None = None) -> dict[str, float]:
    """The learning rate per component now; for D-Adaptation/Prodigy the effective d·lr, as sd-scripts logs."""
    opt = built.optimizer
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        lrs = [float(x) for x in scheduler.get_last_lr()]
    else:
        lrs = [float(g.get("lr") or 0.0) for g in opt.param_groups]
    out: dict[str, float] = {}
    for name, group, lr in zip(built.group_names, opt.param_groups, lrs):
        if "d" in group and built.name.split(".")[-1] in ("Prodigy", "DAdaptAdam"):
            lr = float(group["d"]) * float(group["lr"])
        out[name] = lr
    return out
