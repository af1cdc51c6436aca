"""trainer/job/metrics_log.py: the per-step history the console's curves read."""

from __future__ import annotations

import json

from trainer.core.storage import open_store
from trainer.job.metrics_log import METRICS_KEY, MetricsLog


def _stored(store) -> list[dict]:
    return [json.loads(line) for line in store.get_bytes(METRICS_KEY).decode().splitlines()]


def test_every_step_is_stored_by_the_last_one_and_a_resume_keeps_the_steps_before_it(tmp_path):
    store = open_store(str(tmp_path / "job"))
    log = MetricsLog(store, tmp_path / "work-1" / "metrics.jsonl", flush_every_s=0.05)
    for step in range(1, 6):
        log.record(step, 5, 1, float("nan") if step == 2 else 1.0 / step, 1e-4)
    lines = _stored(store)
    assert [p["step"] for p in lines] == [1, 2, 3, 4, 5]
    assert lines[1]["loss"] is None and lines[0]["loss"] == 1.0 and lines[0]["lr"] == 1e-4
    assert {"step", "epoch", "loss", "lr", "time"} == set(lines[0])

    resumed = MetricsLog(store, tmp_path / "work-2" / "metrics.jsonl", flush_every_s=0.05)
    for step in (4, 5, 6):
        resumed.record(step, 6, 2, 0.5, 2e-4)
    assert [(p["step"], p["epoch"]) for p in _stored(store)] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


def test_other_ranks_write_nothing(tmp_path):
    store = open_store(str(tmp_path / "job"))
    MetricsLog(store, tmp_path / "w" / "metrics.jsonl", enabled=False).record(1, 1, 1, 1.0, 1e-4)
    assert not store.exists(METRICS_KEY) and not (tmp_path / "w").exists()
