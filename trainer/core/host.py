"""What the process may use of its host: its cores (the shrink's worker threads)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its CPU set (a pod's cpuset), not the node's processor count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
