"""Optimizers and LR schedules: names, argument checks and known LR values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import OptimizerSpec, SchedulerSpec
from trainer.train.optim import build_optimizer, current_lrs
from trainer.train.schedule import build_scheduler, warm_restart_factor


def _groups(lr_unet: float = 1e-3, lr_te: float = 5e-4) -> list[dict]:
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(4, 4))], "lr": lr_te, "name": "textencoder"},
            {"params": [torch.nn.Parameter(torch.randn(4, 4))], "lr": lr_unet, "name": "unet"}]


def _lr_trace(sch: SchedulerSpec, *, total: int, warmup: int, lr: float = 1.0) -> list[float]:
    built = build_optimizer(OptimizerSpec(type="SGDNesterov", learning_rate=lr), _groups(lr, lr))
    scheduler = build_scheduler(sch, built.optimizer, total_steps=total, warmup_steps=warmup)
    out = []
    for _ in range(total):
        out.append(scheduler.get_last_lr()[0])
        built.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind, cls_name, args", [
    ("AdamW", "torch.optim.adamw.AdamW", {"weight_decay": 0.01, "betas": [0.9, 0.99]}),
    ("Lion", "lion_pytorch.lion_pytorch.Lion", {"weight_decay": 0.01}),
    ("Prodigy", "prodigyopt.prodigy.Prodigy", {"decouple": True, "weight_decay": 0.01, "d_coef": 2}),
    ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam", {"decouple": True}),
    ("Adafactor", "transformers.optimization.Adafactor", {"relative_step": False, "scale_parameter": False}),
    ("SGDNesterov", "torch.optim.sgd.SGD", {}),
])
def test_each_optimizer_takes_steps_and_names_itself(kind: str, cls_name: str, args: dict) -> None:
    lr = 1.0 if kind in ("Prodigy", "DAdaptAdam") else 1e-3  # they adapt d·lr with lr ≈ 1
    groups = _groups(lr, lr)
    before = [g["params"][0].detach().clone() for g in groups]
    built = build_optimizer(OptimizerSpec(type=kind, args=args, learning_rate=lr), groups)
    assert built.name == cls_name
    for _ in range(2):
        for g in groups:
            (g["params"][0] ** 2).sum().backward()
        built.optimizer.step()
        built.optimizer.zero_grad()
    assert all(not torch.equal(b, g["params"][0]) for b, g in zip(before, groups))
    if args:
        assert built.ss_optimizer.startswith(cls_name + "(") and built.ss_optimizer.endswith(")")
    if kind == "AdamW":
        assert built.optimizer.param_groups[0]["betas"] == (0.9, 0.99)  # list → tuple
        assert built.ss_optimizer == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    if kind == "SGDNesterov":
        assert built.optimizer.param_groups[0]["nesterov"] and built.optimizer.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_arg_is_refused_with_the_accepted_names() -> None:
    with pytest.raises(JobFailure) as exc:
        build_optimizer(OptimizerSpec(type="AdamW", args={"decouple": True}), _groups())
    assert exc.value.reason == Reason.SPEC_INVALID
    assert "'decouple'" in exc.value.message and "weight_decay" in exc.value.message


@pytest.mark.parametrize("kind", ["AdamW8bit", "Lion8bit", "SGDNesterov8bit"])
def test_8bit_optimizers_need_bitsandbytes_on_cuda(kind: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the 8-bit optimizers may run here")
    with pytest.raises(JobFailure) as exc:
        build_optimizer(OptimizerSpec(type=kind), _groups())
    assert exc.value.reason == Reason.SPEC_INVALID
    assert "bitsandbytes" in exc.value.message and "AdamW" in exc.value.message


def test_adafactor_relative_step_drops_group_lrs_and_uses_its_own_schedule() -> None:
    built = build_optimizer(OptimizerSpec(type="Adafactor", learning_rate=1e-3), _groups())
    assert built.args["relative_step"] is True and built.relative_step_lr == 1e-3
    assert all(g["lr"] is None for g in built.optimizer.param_groups)
    scheduler = build_scheduler(SchedulerSpec(type="constant"), built.optimizer, total_steps=10, warmup_steps=0,
                                relative_step_lr=built.relative_step_lr)
    assert type(scheduler).__name__ == "AdafactorSchedule"
    assert scheduler.get_last_lr() == [1e-3, 1e-3]  # initial_lr before the first step
    # warmup_init forces relative_step, as in sd-scripts
    built = build_optimizer(OptimizerSpec(type="Adafactor", args={"relative_step": False, "warmup_init": True}),
                            _groups())
    assert built.args["relative_step"] is True


def test_prodigy_reports_effective_lr_and_uses_one_lr() -> None:
    built = build_optimizer(OptimizerSpec(type="Prodigy", learning_rate=1.0), _groups(1.0, 0.5))
    lrs = current_lrs(built)
    assert set(lrs) == {"textencoder", "unet"}
    assert lrs["unet"] == pytest.approx(1e-6 * 0.5)  # d0 × the first group's lr
    # Prodigy refuses differing group LRs: the first one takes effect (sd-scripts' rule)
    assert [g["lr"] for g in built.optimizer.param_groups] == [0.5, 0.5]


def test_empty_network_is_a_spec_error() -> None:
    with pytest.raises(JobFailure, match="no trainable parameters"):
        build_optimizer(OptimizerSpec(), [{"params": [], "lr": 1e-4}])


def test_standard_schedules_known_values() -> None:
    lin = _lr_trace(SchedulerSpec(type="linear", warmup_steps=2), total=10, warmup=2)
    assert lin[:3] == [0.0, 0.5, 1.0]
    assert lin[3] == pytest.approx(7 / 8)
    cos = _lr_trace(SchedulerSpec(type="cosine"), total=10, warmup=0)
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    cwr = _lr_trace(SchedulerSpec(type="cosine_with_restarts", num_cycles=2), total=10, warmup=0)
    assert cwr[0] == 1.0 and cwr[5] == 1.0  # the restart
    assert cwr[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))
    poly = _lr_trace(SchedulerSpec(type="polynomial", power=2.0), total=10, warmup=0)
    assert poly[5] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7)
    cw = _lr_trace(SchedulerSpec(type="constant_with_warmup", warmup_steps=4), total=10, warmup=4)
    assert cw == [0.0, 0.25, 0.5, 0.75] + [1.0] * 6
    assert _lr_trace(SchedulerSpec(type="constant"), total=5, warmup=0) == [1.0] * 5


def test_group_lrs_scale_together() -> None:
    built = build_optimizer(OptimizerSpec(learning_rate=1e-3), _groups(1e-3, 5e-4))
    scheduler = build_scheduler(SchedulerSpec(type="linear"), built.optimizer, total_steps=4, warmup_steps=0)
    built.optimizer.step()
    scheduler.step()
    lrs = current_lrs(built, scheduler)
    assert lrs == {"textencoder": pytest.approx(5e-4 * 0.75), "unet": pytest.approx(1e-3 * 0.75)}


def test_warm_restarts_cycles_warmup_decay_and_floor() -> None:
    kw = dict(total_steps=30, warmup_steps=0, cycle_steps=10, num_cycles=1, cycle_mult=1.0, cycle_warmup_steps=2,
              peak_decay=0.5, min_lr_ratio=0.1)
    f = [warm_restart_factor(s, **kw) for s in range(30)]
    assert f[0] == pytest.approx(0.1) and f[1] == pytest.approx(0.55) and f[2] == pytest.approx(1.0)  # warmup
    assert f[10] == pytest.approx(0.05) and f[12] == pytest.approx(0.5)  # second cycle peak halves, floor 10%
    assert f[22] == pytest.approx(0.25)
    # the cosine in cycle 1: halfway between peak (1.0) and floor (0.1) at the middle of the decay
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5)
    # cycle_mult stretches the cycles: 4, 8, 16
    g = [warm_restart_factor(s, total_steps=28, warmup_steps=0, cycle_steps=4, num_cycles=1, cycle_mult=2.0,
                             cycle_warmup_steps=0, peak_decay=1.0, min_lr_ratio=0.0) for s in range(28)]
    restarts = [s for s in range(1, 28) if g[s] > g[s - 1] + 1e-9]
    assert restarts == [4, 12]
    # default cycle length = (total - warmup) / num_cycles, after a global warmup
    h = [warm_restart_factor(s, total_steps=14, warmup_steps=2, cycle_steps=None, num_cycles=3, cycle_mult=1.0,
                             cycle_warmup_steps=0, peak_decay=1.0, min_lr_ratio=0.0) for s in range(14)]
    assert h[:3] == [0.0, 0.5, 1.0]
    assert [s for s in range(3, 14) if h[s] > h[s - 1] + 1e-9] == [6, 10]


def test_warm_restarts_through_build_scheduler() -> None:
    trace = _lr_trace(SchedulerSpec(type="cosine_annealing_warm_restarts", cycle_steps=5, min_lr_ratio=0.2),
                      total=10, warmup=0, lr=2.0)
    assert trace[0] == pytest.approx(2.0) and trace[5] == pytest.approx(2.0)
    assert min(trace) >= 0.4 - 1e-9


def test_adafactor_schedule_needs_adafactor() -> None:
    built = build_optimizer(OptimizerSpec(), _groups())
    with pytest.raises(JobFailure, match="Adafactor"):
        build_scheduler(SchedulerSpec(type="adafactor"), built.optimizer, total_steps=5, warmup_steps=0)
