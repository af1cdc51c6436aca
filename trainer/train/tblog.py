"""TensorBoard event logs with sd-scripts' tag names, written by the main process only.

Logs live in `<work_dir>/logs/tensorboard/<log_prefix><timestamp>/` (sd-scripts: `logging_dir`,
`log_prefix` + time). Tags: `loss/current`, `loss/average`, `loss/epoch`, `lr/unet`,
`lr/textencoder` (`lr/textencoder2` for SDXL's second encoder), and with `scale_weight_norms`
`max_norm/keys_scaled`, `max_norm/average_key_norm`, `max_norm/max_key_norm`.
"""

from __future__ import annotations

import os
import time
from typing import Any

# Parameter-group name → TensorBoard tag.
_LR_TAGS = {"unet": "lr/unet", "te": "lr/textencoder", "te1": "lr/textencoder", "textencoder": "lr/textencoder",
            "text_encoder": "lr/textencoder", "te2": "lr/textencoder2", "textencoder2": "lr/textencoder2"}


def lr_tag(group_name: str) -> str:
    return _LR_TAGS.get(group_name, f"lr/{group_name}")


def log_dir(work_dir: str, log_prefix: str | None, *, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now if now is not None else time.time()))
    return os.path.join(work_dir, "logs", "tensorboard", f"{log_prefix or ''}{stamp}")


class TensorBoardLog:
    """A thin SummaryWriter wrapper; a disabled one (other ranks, log_with = none) does nothing."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._writer: Any = None
        if directory:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(directory, exist_ok=True)
            self._writer = SummaryWriter(log_dir=directory)

    def step(self, step: int, *, loss: float, avg_loss: float, lrs: dict[str, float],
             max_norm: tuple[int, float, float] | None = None) -> None:
        if self._writer is None:
            return
        w = self._writer
        w.add_scalar("loss/current", loss, step)
        w.add_scalar("loss/average", avg_loss, step)
        for name, lr in lrs.items():
            w.add_scalar(lr_tag(name), lr, step)
        if max_norm is not None:
            keys_scaled, mean_norm, maximum = max_norm
            w.add_scalar("max_norm/keys_scaled", keys_scaled, step)
            w.add_scalar("max_norm/average_key_norm", mean_norm, step)
            w.add_scalar("max_norm/max_key_norm", maximum, step)

    def epoch(self, epoch: int, avg_loss: float) -> None:
        if self._writer is not None:
            self._writer.add_scalar("loss/epoch", avg_loss, epoch)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
