"""Where intermediate and final adapter files go, named as sd-scripts names them, and which to keep.

`<output_name>-000001.safetensors` after epoch 1, `<output_name>-step00000100.safetensors` after step
100, `<output_name>.safetensors` at the end (train_util's EPOCH_FILE_NAME / STEP_FILE_NAME).
`save_last_n_epochs` / `save_last_n_steps` keep the newest N of each kind, as sd-scripts' removal of
`epoch - save_every_n_epochs * save_last_n_epochs` does for regular intervals.
"""

from __future__ import annotations

import os
import re

EXT = ".safetensors"


def epoch_file_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}{EXT}"


def step_file_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}{EXT}"


def final_file_name(output_name: str) -> str:
    return f"{output_name}{EXT}"


def epoch_save_due(epoch: int, total_epochs: int, every: int | None) -> bool:
    """After `epoch` (1-based); the last epoch is covered by the final save, as in sd-scripts."""
    return bool(every) and epoch % every == 0 and epoch < total_epochs


def step_save_due(step: int, total_steps: int, every: int | None) -> bool:
    return bool(every) and step % every == 0 and step < total_steps


def files_to_remove(existing: list[str], output_name: str, *, keep_epochs: int | None,
                    keep_steps: int | None) -> list[str]:
    """Intermediate saves beyond the newest `keep_*` of their kind (file names, not paths)."""
    esc = re.escape(output_name)
    kinds = ((re.compile(esc + r"-(\d{6})" + re.escape(EXT) + "$"), keep_epochs),
             (re.compile(esc + r"-step(\d{8})" + re.escape(EXT) + "$"), keep_steps))
    stale: list[str] = []
    for pattern, keep in kinds:
        if not keep:
            continue
        found = sorted((int(m.group(1)), name) for name in existing if (m := pattern.match(name)))
        stale += [name for _, name in found[:-keep]]
    return stale


def prune(out_dir: str, output_name: str, *, keep_epochs: int | None, keep_steps: int | None) -> list[str]:
    """Delete stale intermediate saves in `out_dir`; returns the removed file names."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    removed = files_to_remove(names, output_name, keep_epochs=keep_epochs, keep_steps=keep_steps)
    for name in removed:
        os.remove(os.path.join(out_dir, name))
    return removed
