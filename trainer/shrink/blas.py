"""The shrink's two heavy products, Gram matrices and the re-formed factors, on CPU through numpy.

numpy hands AᵀA to BLAS's SYRK (half the flops of the GEMM torch runs for it). On the AMD EPYC dev
host that made a rank-64 Gram 1.15–1.35× faster than torch's batched MKL GEMM, and a rank-32 or
rank-16 one 1.2–1.8× slower (per-call overhead on small products; docs/benchmarks.md, "Shrink"), so
numpy takes the Grams from rank `SYRK_MIN_RANK` up. The re-formed factors go through numpy at every
rank: each layer's product at its own width, with no padding. Tensors that numpy cannot hold (GPU,
bf16) go through torch. numpy releases the GIL inside BLAS, so the shrink's threads still share
batches out; `single_threaded_blas` keeps OpenBLAS from starting threads of its own under them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

_NUMPY_DTYPES = (torch.float32, torch.float64)
SYRK_MIN_RANK = 48  # below this, torch's batched GEMM beat per-layer SYRK calls (measured at 16, 32, 64)


def _on_numpy(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES for t in tensors)


def grams(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """(LᵀL, R·Rᵀ) for a batch of products: left (b, m, k), right (b, k, n) → two (b, k, k)."""
    b, k = left.shape[0], left.shape[2]
    if k < SYRK_MIN_RANK or not _on_numpy(left, right):
        return left.mT @ left, right @ right.mT
    g_left = np.empty((b, k, k), dtype=left.numpy().dtype)
    g_right = np.empty_like(g_left)
    for j, (lj, rj) in enumerate(zip(left.numpy(), right.numpy())):  # one SYRK each: numpy spots Aᵀ·A
        np.matmul(lj.T, lj, out=g_left[j])
        np.matmul(rj, rj.T, out=g_right[j])
    return torch.from_numpy(g_left), torch.from_numpy(g_right)


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
