"""The fast path of the training step: the compiled forward, the compile cache, CUDA-only settings.

`precision.torch_compile` (decided by `trainer.core.spec.compile_choice`) "auto" compiles on CUDA for the adapters that trace into one graph and never
on CPU (tests and the demo stay eager); `true` compiles whatever the adapter, `false` never. What is
compiled is the step's forward and loss (`trainer.train.loop.prediction_loss`): AOTAutograd traces
its backward from it, so `loss.backward()` runs the compiled backward graph. Sampling noise and
timesteps, and the host-to-device copies of the batch, stay outside, so the RNG streams are eager's.
On CUDA the mode is "reduce-overhead" (CUDA graphs, one per bucket shape) with `dynamic=False`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch

def place_compile_cache(cache_root: str) -> str:
    """Inductor's and Triton's caches under the node's model cache, so the next job on the node reuses
    the kernels; an operator's own TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR wins."""
    root = os.path.join(cache_root, "compile")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(root, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(root, "triton"))
    return root


def cuda_speedups(parts: Any, device: torch.device) -> None:
    """TF32 matmuls for fp32 runs and channels_last for the UNet: both help only on CUDA, and CPU runs keep
    their exact fp32 results."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    parts.unet.to(memory_format=torch.channels_last)


class TimedCompile:
    """`fn` under torch.compile; the seconds spent in calls that compiled (a new bucket shape) are summed
    into `seconds`, told apart from ordinary calls by dynamo's count of compiled frames."""

    def __init__(self, fn: Callable[..., Any], *, backend: str, fullgraph: bool, cuda: bool) -> None:
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        # One graph per bucket shape: real datasets have tens of buckets, beyond dynamo's default of 8 (past
        # which it would run the step eager without a word).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.fn = torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False, mode=mode)
        self.graphs = mode == "reduce-overhead"
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        t0 = time.monotonic()
        if self.graphs:  # each call is a new training step: the previous replay's outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(*args, **kwargs)
        if counters["stats"]["unique_graphs"] != before:
            self.seconds += time.monotonic() - t0
        return out
