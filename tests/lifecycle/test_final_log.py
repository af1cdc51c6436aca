"""The trainer log stored with a finished job (what `GET /v1/jobs/{id}/logs` serves once the job is
finished) holds the attempt's last lines: it is uploaded after the end is logged, before the final
status. Fast: the trainer's StatusReporter against a local store, no training."""

from __future__ import annotations

import logging

import pytest

from trainer.core.jobdir import StatusReporter
from trainer.core.jobkeys import LOG_KEY, STATUS_KEY
from trainer.core.storage import LocalStore


@pytest.fixture
def trainer_log(tmp_path):
    path = tmp_path / "trainer.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield path
    root.removeHandler(handler)
    root.setLevel(old_level)
    handler.close()


@pytest.mark.parametrize("phase, reason, last", [
    ("succeeded", None, "phase: succeeded"),
    ("failed", "dataset_invalid", "phase: failed (dataset_invalid)"),
    ("cancelled", "cancelled", "phase: cancelled (cancelled)"),
])
def test_the_stored_log_ends_with_the_attempts_end(tmp_path, trainer_log, phase, reason, last):
    store = LocalStore(tmp_path / "job")
    seen_at_status: list[str] = []
    put_json = store.put_json

    def spy(key, obj, **kw):  # what the stored log held when the final status landed
        if key == STATUS_KEY and obj.phase == phase:
            seen_at_status.append((tmp_path / "job" / LOG_KEY).read_text())
        return put_json(key, obj, **kw)

    store.put_json = spy  # type: ignore[method-assign]
    reporter = StatusReporter(store, attempt=1, interval_s=60, log_path=str(trainer_log))
    reporter.start()
    reporter.set_phase("uploading")
    logging.getLogger("lathe.run").info("job %s", phase)
    reporter.finish(phase, reason=reason, message="why")
    lines = (tmp_path / "job" / LOG_KEY).read_text().splitlines()
    assert lines[-3:] == ["INFO lathe.jobdir: phase: uploading", f"INFO lathe.run: job {phase}",
                          f"INFO lathe.jobdir: {last}"], lines
    assert seen_at_status and seen_at_status[0].splitlines()[-1].endswith(last)
