"""Background loading of the batches ahead of the one a step is computing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Prefetcher:
    """Loads the next batches in background threads while the current step computes."""

    def __init__(self, load: Callable[[int], Any], count: int, workers: int) -> None:
        self._load, self._count = load, count
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self._pending: dict[int, Any] = {}
        self._depth = max(1, workers)

    def get(self, index: int) -> Any:
        if self._pool is None:
            return self._load(index)
        for ahead in range(index, min(self._count, index + self._depth + 1)):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._load, ahead)
        return self._pending.pop(index).result()

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending.values():
                fut.cancel()
            self._pool.shutdown(wait=True)
