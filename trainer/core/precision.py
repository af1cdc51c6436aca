"""Save precisions: the names a spec, the CLIs and adapter metadata give the dtype of written weights.

Torch-free, so the service validates the same names; the torch side maps each name through
`TORCH_DTYPE_NAMES` (`getattr(torch, ...)`) next to where it casts.
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "fp16", "bf16"]
SAVE_PRECISIONS: tuple[str, ...] = get_args(Precision)
# The torch dtype attribute each name stands for.
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# sd-scripts' own spelling of fp32 (its --save_precision and merge tools accept it).
PRECISION_ALIASES = {"float": "fp32"}


def canonical_precision(name: str) -> str | None:
    """`name` as one of SAVE_PRECISIONS (an sd-scripts alias resolved); None when unknown."""
    name = PRECISION_ALIASES.get(name, name)
    return name if name in SAVE_PRECISIONS else None
