"""`metrics.jsonl` in the job directory: one JSON line per optimizer step (step, epoch, loss, lr, time).

The console draws the loss and learning-rate curves from it (GET /v1/jobs/{id}/metrics). Lines go to a
local file on every step; the file is uploaded in batches (at most once every `flush_every_s`, and at
the last step) by a background thread, so a step never waits on the object store. Object stores cannot
append: each flush rewrites the whole object, which stays small (~80 bytes a step). A resumed attempt
starts from the stored file, keeping the lines before the step it resumed at.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from trainer.core.storage import NotFound, StorageError, Store

log = logging.getLogger("lathe.metrics")

from trainer.core.jobkeys import METRICS_KEY


class MetricsLog:
    def __init__(self, store: Store, local_path: str | Path, *, enabled: bool = True,
                 flush_every_s: float = 2.0) -> None:
        self.store, self.path, self.enabled = store, Path(local_path), enabled
        self.flush_every_s = flush_every_s
        self._started = False
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def record(self, step: int, total: int, epoch: int, loss: float | None, lr: float | None) -> None:
        """One step's line; the last step (`step >= total`) is uploaded before returning."""
        if not self.enabled:
            return
        if not self._started:
            self._start(step)
        line = {"step": step, "epoch": epoch, "loss": _finite(loss), "lr": _finite(lr), "time": round(time.time(), 3)}
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if step >= total:
            self.flush()
        else:
            self._dirty.set()

    def flush(self) -> None:
        self._dirty.clear()
        with self._lock:
            try:
                self.store.upload_file(str(self.path), METRICS_KEY)
            except (StorageError, OSError) as exc:
                log.warning("metrics.jsonl upload failed (%s); retrying with the next batch", exc)
                self._dirty.set()

    def _start(self, first_step: int) -> None:
        self._started = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        try:  # a resumed attempt: the history before the checkpoint it resumed from
            for raw in self.store.get_bytes(METRICS_KEY).decode("utf-8", "replace").splitlines():
                try:
                    if int(json.loads(raw)["step"]) < first_step:
                        kept.append(raw)
                except (ValueError, KeyError, TypeError):
                    continue
        except NotFound:
            pass
        except StorageError as exc:
            log.warning("could not read the previous metrics.jsonl (%s); starting a new one", exc)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="lathe-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(self.flush_every_s)  # batch the steps of the next interval into one upload
            if self._dirty.is_set():
                self.flush()


def _finite(value: float | None) -> float | None:
    """NaN/inf are not JSON: a diverged step is recorded without a value."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)
