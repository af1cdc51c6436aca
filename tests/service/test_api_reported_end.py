"""A trainer's own report of its end (a terminal status.json) before the reconciler has recorded it in
job.json: GET, the list, cancel and DELETE must all answer from one view of the job, the one job.json
is about to hold, and that record carries the attempt's exit code. Driven step by step (a reconciler
pass is run by hand), not by racing the reconciler's loop."""

from __future__ import annotations

import time

import msgspec
import pytest

from trainer.core.jobkeys import CANCEL_KEY, STATUS_KEY
from service.reconcile.reconciler import Reconciler
from tests.service.conftest import RunningLauncher, auth, spec
from trainer.core.status import ErrorInfo, JobStatus


def _launched_job(client, bucket, **changes):
    """A job whose attempt 1 is launched, and a reconciler to advance it by hand."""
    services = client.app.state.services
    r = client.post("/v1/jobs", json={"spec": spec(bucket, **changes)}, headers=auth())
    assert r.status_code == 201, r.text
    reconciler = Reconciler(services.settings, services.store, services.tenants, launcher=RunningLauncher())
    reconciler.tick()
    job_id = r.json()["id"]
    assert services.store.read_record("acme", job_id).state == "launched"
    return services.store, reconciler, job_id


def _report(store, job_id, phase, reason=None, at=None):
    at = time.time() if at is None else at
    error = ErrorInfo(reason=reason, message=f"{reason} reported") if reason else None
    store.job_dir("acme", job_id).put_json(STATUS_KEY, JobStatus(phase=phase, attempt=1, revision=7, error=error,
                                                                  heartbeat_at=at, started_at=at - 5, updated_at=at))
    return at


def test_a_reported_end_is_one_view_for_get_list_cancel_and_delete(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    store, reconciler, job_id = _launched_job(client, bucket)
    at = _report(store, job_id, "succeeded")
    assert store.read_record("acme", job_id).final_phase is None  # job.json not closed yet

    job = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert job["phase"] == "succeeded" and job["finished_at"] == at, job
    assert job["attempts"] == [{"attempt": 1, "launched_at": job["attempts"][0]["launched_at"], "ended_at": at,
                                "reason": None, "exit_code": 0}], job
    listed = client.get("/v1/jobs", headers=auth()).json()["items"]
    assert [(j["id"], j["phase"]) for j in listed] == [(job_id, "succeeded")]

    # cancel: a finished job, so nothing to do: no marker, the same view back
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth())
    assert r.status_code == 202 and r.json()["phase"] == "succeeded" and not r.json()["cancel_requested"], r.text
    assert not store.job_dir("acme", job_id).exists(CANCEL_KEY)

    # DELETE agrees the job is finished, and waits for job.json's writer: with no reconciler running, 503
    r = client.delete(f"/v1/jobs/{job_id}", headers=auth())
    assert r.status_code == 503 and "retry" in r.json()["detail"], r.text
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).json() == job  # nothing deleted, nothing changed

    reconciler.tick()  # records exactly what GET showed
    recorded = store.read_record("acme", job_id)
    assert (recorded.final_phase, recorded.finished_at, recorded.attempts[0].ended_at) == ("succeeded", at, at)
    after = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert {k: v for k, v in after.items() if k != "updated_at"} == {k: v for k, v in job.items() if k != "updated_at"}
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth()).status_code == 204
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).status_code == 404


def test_delete_waits_for_a_running_reconciler_to_record_the_end(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    store, reconciler, job_id = _launched_job(client, bucket)
    _report(store, job_id, "succeeded")
    reconciler.settings = msgspec.structs.replace(reconciler.settings, reconcile_interval_s=0.3)
    reconciler.start()
    try:
        assert client.delete(f"/v1/jobs/{job_id}", headers=auth()).status_code == 204
    finally:
        reconciler.stop()
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).status_code == 404


@pytest.mark.parametrize("phase, reason, exit_code, job_phase, max_attempts", [
    ("succeeded", None, 0, "succeeded", 1),
    ("cancelled", "cancelled", 22, "cancelled", 1),
    ("failed", "spec_invalid", 10, "failed", 1),
    ("failed", "nan_loss", 13, "failed", 3),
    ("failed", "storage_error", 21, "queued", 3),  # retried: the attempt ends, the job goes on
    ("failed", "preempted", 20, "failed", 1),  # retryable, but no attempt left
])
def test_attempts_that_reported_their_end_carry_its_exit_code(client_factory, bucket, phase, reason, exit_code,
                                                              job_phase, max_attempts):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    store, reconciler, job_id = _launched_job(client, bucket, **{"resources.max_attempts": max_attempts})
    at = _report(store, job_id, phase, reason)
    shown = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    reconciler.tick()
    recorded = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    for job in (shown, recorded):
        assert job["phase"] == job_phase, job
        assert (job["attempts"][0]["exit_code"], job["attempts"][0]["reason"], job["attempts"][0]["ended_at"]) == (
            exit_code, reason, at), job
        assert job["finished_at"] == (None if job_phase == "queued" else at), job
