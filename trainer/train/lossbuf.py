"""Step losses kept on the device and read back in batches.

Reading a loss (`float(loss)`) waits for the GPU to finish the step, so the host cannot queue the next
one: the buffer holds each step's loss tensor and the recipe flushes it every `every` steps, at least
once a second (`max_age_s`), and before anything that needs the history (a save, a checkpoint, a
sample, the end). The non-finite check runs on each flush and names the first bad step.
"""

from __future__ import annotations

import math
import time

import torch

from trainer.core.failures import JobFailure, Reason


def nan_failure(step: int) -> JobFailure:
    return JobFailure(Reason.NAN_LOSS, f"loss became nan/inf at step {step}; lower the learning rate, use "
                      "mixed_precision 'bf16' instead of 'fp16', or set optimizer.max_grad_norm")


class LossBuffer:
    """(step, its micro-batch losses on the device) since the last flush."""

    def __init__(self, every: int, max_age_s: float | None = 1.0) -> None:
        self.every, self.max_age_s = max(1, every), max_age_s
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.last_flush = time.monotonic()

    def push(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def due(self) -> bool:
        if len(self.pending) >= self.every:
            return True
        return bool(self.pending) and self.max_age_s is not None and time.monotonic() - self.last_flush >= self.max_age_s

    def flush(self) -> list[tuple[int, list[float]]]:
        """Each pending step's micro-batch losses as floats, read back in one transfer."""
        self.last_flush = time.monotonic()
        if not self.pending:
            return []
        flat = torch.cat([v.float().reshape(-1) for _, v in self.pending]).tolist()
        out, at = [], 0
        for step, v in self.pending:
            out.append((step, flat[at:at + v.numel()]))
            at += v.numel()
        self.pending = []
        return out


def first_bad_step(flushed: list[tuple[int, list[float]]]) -> int | None:
    """The first step with a non-finite micro-batch loss."""
    return next((s for s, vs in flushed if not all(math.isfinite(v) for v in vs)), None)
