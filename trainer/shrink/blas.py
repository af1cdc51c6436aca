"""The re-formed factors of a shrink on CPU through numpy: each layer's product at its own width, with
no padding. Tensors that numpy cannot hold (GPU, bf16) go through torch. numpy releases the GIL inside
BLAS, so the shrink's threads still share batches out; `single_threaded_blas` keeps OpenBLAS from
starting threads of its own under them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = (torch.float32, torch.float64)


def _on_numpy(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES for t in tensors)


def matmuls(lefts: Sequence[Tensor], rights: Sequence[Tensor]) -> list[Tensor]:
    """lefts[j] @ rights[j] for each j, each result a tensor of its own."""
    if not all(_on_numpy(a, b) for a, b in zip(lefts, rights)):
        return [a @ b for a, b in zip(lefts, rights)]
    return [torch.from_numpy(np.matmul(a.numpy(), b.numpy())) for a, b in zip(lefts, rights)]


@contextmanager
def single_threaded_blas():
    """numpy's BLAS on one thread per call, for the duration: the shrink runs one call per core itself.
    (torch's own threads are left as they are.)"""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
