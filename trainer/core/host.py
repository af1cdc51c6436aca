"""What the process may use of its host: its cores (the shrink's pool, the transfers), and pauses of
Python's cyclic garbage collector around allocation-heavy work (the CRT transfers, which say why)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager


def usable_cores() -> int:
    """Cores this process may run on: its CPU set (a pod's cpuset), not the node's processor count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block; the collector is left as it was found (a caller that
    had it disabled keeps it disabled). Reference counting still frees everything acyclic."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
