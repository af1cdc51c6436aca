"""Job lifecycle through the real app, the LocalLauncher and the stand-in trainer: retries, exit
codes, lost jobs, cancel, the queue, SSE resume, listing, logs, delete, webhooks, retention."""

from __future__ import annotations

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from service.client import Client
from service.reconcile.reconciler import Reconciler
from service.reconcile.webhooks import decode_secret, verify
from tests.service.conftest import TOKENS, RunningLauncher, auth, spec, wait_finished, wait_for, wait_phase


def submit(client, bucket, tenant="acme", **changes) -> str:
    r = client.post("/v1/jobs", json={"spec": spec(bucket, **changes)}, headers=auth(tenant))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_retryable_failures_start_a_new_attempt_final_ones_do_not(client_factory, bucket):
    client = client_factory()
    reported = submit(client, bucket, name="fail-once")   # status.json says storage_error (retryable)
    crashed = submit(client, bucket, name="crash-once")   # exit code 1 and no final status
    final = submit(client, bucket, name="fail-final")     # dataset_invalid: no retry
    job = wait_phase(client, reported, {"succeeded", "failed"})
    assert job["phase"] == "succeeded" and job["attempt"] == 2, job
    assert [a["reason"] for a in job["attempts"]] == ["storage_error", None]
    job = wait_phase(client, crashed, {"succeeded", "failed"})
    assert job["phase"] == "succeeded" and job["attempts"][0]["reason"] == "internal", job
    assert job["attempts"][0]["exit_code"] == 1
    job = wait_phase(client, final, {"succeeded", "failed"})
    assert job["phase"] == "failed" and job["attempt"] == 1
    assert job["error"]["reason"] == "dataset_invalid" and "x.png" in job["error"]["message"]


def test_a_killed_trainer_is_lost_after_its_heartbeat_stops_and_retried(client_factory, bucket, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    client = client_factory(heartbeat_timeout_s=1.5)
    job_id = submit(client, bucket, **{"training.max_train_steps": 8})
    wait_phase(client, job_id, "training")
    launcher = client.app.state.services.extra["launcher"]
    run = launcher.run_dir("acme", job_id, 1)
    os.killpg(int((run / "pid").read_text()), signal.SIGKILL)  # no exit record, no final status
    job = wait_phase(client, job_id, {"succeeded", "failed"}, timeout_s=40)
    assert job["phase"] == "succeeded" and job["attempt"] == 2, job
    assert job["attempts"][0]["reason"] == "lost"


def test_cancel_running_and_queued_jobs(client_factory, bucket, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.3")
    client = client_factory(max_running_jobs=1)
    running = submit(client, bucket, **{"training.max_train_steps": 100})
    queued = submit(client, bucket)
    wait_phase(client, running, "training")
    assert client.get(f"/v1/jobs/{queued}", headers=auth()).json()["phase"] == "queued"  # the queue holds it
    r = client.post(f"/v1/jobs/{queued}/cancel", headers=auth())
    assert r.status_code == 202 and r.json()["cancel_requested"]
    job = wait_phase(client, queued, "cancelled")
    assert job["attempt"] == 0 and job["error"]["reason"] == "cancelled"
    client.post(f"/v1/jobs/{running}/cancel", headers=auth())
    job = wait_phase(client, running, {"cancelled", "failed", "succeeded"})
    assert job["phase"] == "cancelled" and job["progress"]["step"] < 100, job
    log = client.get(f"/v1/jobs/{running}/logs", headers=auth()).text
    assert "stopping at step" in log


def test_queue_runs_jobs_one_after_the_other(client_factory, bucket):
    client = client_factory(max_running_jobs=1)
    ids = [submit(client, bucket) for _ in range(2)]
    jobs = [wait_finished(client, j) for j in ids]
    assert all(j["phase"] == "succeeded" for j in jobs)
    spans = sorted((j["attempts"][0]["launched_at"], j["attempts"][0]["ended_at"]) for j in jobs)
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:])), spans
    # the reconciler counts a job after writing its record, so a reader may see the phase first
    expected = ("lathe_launch_latency_seconds_count 2.0", 'lathe_jobs_finished_total{phase="succeeded"} 2.0')

    def counted() -> str | None:
        text = client.get("/metrics").text
        return text if all(e in text for e in expected) else None

    metrics = wait_for(counted, timeout_s=10, what="both jobs counted in /metrics")
    assert 'lathe_http_requests_total{method="POST",route="/v1/jobs",status="201"} 2.0' in metrics


def test_events_stream_progress_and_resume_with_last_event_id(live_server_factory, bucket, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    server = live_server_factory()
    with Client(server.url, TOKENS["acme"]) as api:
        job_id = api.submit(spec(bucket, **{"training.max_train_steps": 10}))["id"]
        events = list(api.events(job_id))
        ids = [int(i) for i, _, _ in events]
        assert ids == sorted(ids) and events[-1][2]["phase"] == "succeeded"
        assert events[0][1] == "phase" and any(kind == "progress" for _, kind, _ in events)
        assert {e[2]["phase"] for e in events} >= {"training", "succeeded"}
        middle = ids[len(ids) // 2]
        resumed = list(api.events(job_id, last_event_id=str(middle)))
        assert resumed and all(int(i) > middle for i, _, _ in resumed)
        assert resumed[-1][2]["phase"] == "succeeded"


def test_list_is_newest_first_with_cursor_and_status_filter(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    ids = [submit(client, bucket, tenant=t) for t in ("acme", "acme", "acme", "other")]
    page = client.get("/v1/jobs", params={"limit": 2}, headers=auth()).json()
    assert [i["id"] for i in page["items"]] == ids[2:0:-1] and page["next_cursor"]
    page2 = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=auth()).json()
    assert [i["id"] for i in page2["items"]] == [ids[0]] and page2["next_cursor"] is None
    queued = client.get("/v1/jobs", params={"status": "queued"}, headers=auth()).json()
    assert len(queued["items"]) == 3
    assert client.get("/v1/jobs", params={"status": "succeeded"}, headers=auth()).json()["items"] == []
    r = client.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=auth())
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")


def test_delete_removes_a_finished_job_and_its_outputs(client_factory, bucket, s3):
    client = client_factory()
    job_id = submit(client, bucket, **{"save.output_uri": f"s3://{bucket}/results/acme/run1/"})
    running = submit(client, bucket, **{"training.max_train_steps": 1000})
    r = client.delete(f"/v1/jobs/{running}", headers=auth())
    assert r.status_code == 409  # not finished
    # Finished as the reconciler records it (not just the trainer's terminal status): delete needs that.
    job = wait_finished(client, job_id)
    # The stand-in trainer writes into the job directory; the service deletes listed outputs anywhere allowed.
    prefix = job["job_uri"].split(f"s3://{bucket}/", 1)[1]
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] > 0
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth("other")).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth()).status_code == 204
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).status_code == 404
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] == 0
    assert job_id not in {i["id"] for i in client.get("/v1/jobs", headers=auth()).json()["items"]}


def test_webhooks_are_signed_on_terminal_states(client_factory, bucket):
    received: list[tuple[dict, bytes]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    try:
        client = client_factory(webhook_secret=secret, webhook_allow_private=True)
        url = f"http://127.0.0.1:{httpd.server_port}/hook"
        r = client.post("/v1/jobs", json={"spec": spec(bucket), "webhook_url": url}, headers=auth())
        job_id = r.json()["id"]
        wait_phase(client, job_id, "succeeded")
        headers, body = wait_for(lambda: received and received[0], 10, what="the webhook")
        assert verify(decode_secret(secret), headers, body)
        event = json.loads(body)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
        assert headers["webhook-id"] == f"{job_id}-succeeded-1"
    finally:
        httpd.shutdown()


def test_retention_expires_finished_jobs_only(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0, retention_s=5.0)
    services = client.app.state.services
    finished, active = submit(client, bucket), submit(client, bucket)
    record = services.store.read_record("acme", finished)
    record.state, record.final_phase, record.finished_at = "finished", "succeeded", record.submitted_at
    services.store.write_record(record)
    reconciler = Reconciler(services.settings, services.store, services.tenants, launcher=None)  # type: ignore[arg-type]
    reconciler.clock = lambda: record.submitted_at + 10
    assert reconciler.expire_old_jobs() == 1
    assert client.get(f"/v1/jobs/{finished}", headers=auth()).status_code == 404
    assert client.get(f"/v1/jobs/{active}", headers=auth()).json()["phase"] == "queued"


def test_two_replicas_racing_for_one_queued_job_launch_it_once(client_factory, bucket):
    client = client_factory(launcher="none", reconcile_interval_s=0)
    services = client.app.state.services
    job_id = submit(client, bucket)
    launchers = [RunningLauncher(), RunningLauncher()]
    replicas = [Reconciler(services.settings, services.store, services.tenants, launcher=launcher)
                for launcher in launchers]
    # Both read the queued record before either writes: the race two replicas' loops can run into.
    seen = [replica._active_jobs() for replica in replicas]
    launched = [replica._advance(active[0], 0) for replica, active in zip(replicas, seen)]
    assert launched == [1, 1]  # both count the job as running
    assert launchers[0].launched + launchers[1].launched == [(job_id, 1)]  # but one launcher started it
    assert services.store.read_record("acme", job_id).attempt == 1
