"""Learning-rate schedules by sd-scripts' `--lr_scheduler` names, stepped once per optimizer update.

The standard ones come from `diffusers.optimization.get_scheduler` (what sd-scripts' get_scheduler_fix
calls), so `polynomial` ends at diffusers' lr_end (1e-7) and `cosine_with_restarts` uses hard restarts.
`adafactor` is transformers' AdafactorSchedule (a proxy reading Adafactor's own LR).
`cosine_annealing_warm_restarts` is the custom schedule of the Russian guide, built in so nobody has to
load a Python class by name: cycles of length T_0·mult^i, a linear warmup at the start of every cycle,
the peak decaying by `peak_decay` per cycle and a floor at `min_lr_ratio` of the (decayed) peak.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import SchedulerSpec

log = logging.getLogger("lathe.train")


def warm_restart_factor(step: int, *, total_steps: int, warmup_steps: int, cycle_steps: int | None, num_cycles: int,
                        cycle_mult: float, cycle_warmup_steps: int, peak_decay: float, min_lr_ratio: float) -> float:
    """LR multiplier at `step` (0-based) of the built-in cosine annealing with warm restarts."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    pos = step - warmup_steps
    span = max(1, total_steps - warmup_steps)
    length = float(cycle_steps) if cycle_steps else span / max(1, num_cycles)
    cycle = 0
    # Walk the cycles (their count is small: at most total / T_0).
    while pos >= length and length >= 1:
        pos -= length
        cycle += 1
        length = length * cycle_mult
    peak = peak_decay**cycle
    floor = min_lr_ratio * peak
    w = min(cycle_warmup_steps, max(0, int(length) - 1))
    if pos < w:
        return floor + (peak - floor) * pos / w
    progress = (pos - w) / max(1.0, length - w)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(sch: SchedulerSpec, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    relative_step_lr: float | None = None) -> Any:
    """The scheduler for `total_steps` optimizer updates with `warmup_steps` of linear warmup."""
    from diffusers.optimization import get_scheduler

    name = sch.type
    if relative_step_lr is not None:
        # Adafactor with relative_step sets its own LR; sd-scripts switches to the adafactor schedule.
        if name != "adafactor":
            log.info("Adafactor with relative_step: using the 'adafactor' schedule instead of '%s' (as sd-scripts)", name)
        name = "adafactor"
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise JobFailure(Reason.SPEC_INVALID, "scheduler.type 'adafactor' needs optimizer.type = 'Adafactor'")
        if warmup_steps:
            log.warning("the adafactor schedule has no warmup; scheduler.warmup_steps is ignored")
        return AdafactorSchedule(optimizer, relative_step_lr if relative_step_lr is not None else 0.0)
    if name == "constant":
        if warmup_steps:
            log.warning("the 'constant' scheduler ignores warmup; use 'constant_with_warmup'")
        return get_scheduler("constant", optimizer)
    if name == "cosine_annealing_warm_restarts":
        params = dict(total_steps=total_steps, warmup_steps=warmup_steps, cycle_steps=sch.cycle_steps,
                      num_cycles=sch.num_cycles, cycle_mult=sch.cycle_mult, cycle_warmup_steps=sch.cycle_warmup_steps,
                      peak_decay=sch.peak_decay, min_lr_ratio=sch.min_lr_ratio)
        return LambdaLR(optimizer, lambda step: warm_restart_factor(step, **params))
    # 'polynomial' with a learning rate at or below its 1e-7 end is refused by the spec check.
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=sch.num_cycles, power=sch.power)
