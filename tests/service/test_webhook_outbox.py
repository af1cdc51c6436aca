"""The webhook outbox (service/state/outbox.py) on the local S3 server and on a local folder, with real HTTP
receivers on 127.0.0.1: an event leaves the store only after a 2xx, retries follow the schedule kept in
the store (so a new process picks them up), an abandoned claim is taken over when its lease runs out,
two replicas deliver each event once, and a slow receiver does not delay another one, down to two
tenants' jobs through the API; a job that ended without its webhook queued gets it on the next pass."""

from __future__ import annotations

import time
import uuid

import pytest

from service.api.metrics import Metrics
from service.state.outbox import EVENT_KEY, Outbox, WebhookDispatcher, retry_delay_s, try_name
from service.reconcile.webhooks import WebhookEvent, WebhookSender, decode_secret, verify
from tests.service.conftest import auth, spec, wait_for, wait_phase
from tests.service.webhook_receiver import Receiver
from trainer.core.storage import LocalStore, open_store

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(params=["s3", "local"])
def state(request, bucket, tmp_path):
    """A fresh state root: a prefix of the module's bucket, or a local folder (conditional PUTs and
    listings differ between the two)."""
    if request.param == "s3":
        return open_store(f"s3://{bucket}/outbox-{uuid.uuid4().hex[:8]}/")
    return LocalStore(tmp_path / "state")


@pytest.fixture()
def s3_state(bucket):
    """For the tests of timing, which do not depend on the store."""
    return open_store(f"s3://{bucket}/outbox-{uuid.uuid4().hex[:8]}/")


def dispatcher(state, *, max_attempts=6, retry_base_s=0.3, timeout_s=5.0, allow_private=True, workers=4,
               metrics=None) -> WebhookDispatcher:
    sender = WebhookSender(secret=SECRET, timeout_s=timeout_s, allow_private=allow_private)
    return WebhookDispatcher(Outbox(state), sender, max_attempts=max_attempts, retry_base_s=retry_base_s,
                             poll_s=0.05, workers=workers, metrics=metrics)


def event(url: str, msg_id: str | None = None) -> WebhookEvent:
    msg_id = msg_id or f"j-20260101t000000-{uuid.uuid4().hex[:8]}-succeeded-1"
    return WebhookEvent(url=url, msg_id=msg_id, type="job.succeeded", data={"id": msg_id, "phase": "succeeded"})


def pending(state) -> list[str]:
    return sorted(info.key.split("/", 1)[1] for info in state.list("webhooks/"))


def test_an_event_leaves_the_outbox_only_after_a_2xx(s3_state):
    with Receiver(statuses=(500, 503, 204)) as hook:
        d = dispatcher(s3_state, retry_base_s=1.0)  # long enough for the "too early" pass on a loaded machine
        ev = event(hook.url)
        d.enqueue(ev)
        assert [k.rsplit("/", 1)[1] for k in pending(s3_state)] == [EVENT_KEY]
        d.run_pass()  # attempt 1: HTTP 500, recorded with its retry time
        entry = d.outbox.scan().popitem()[1][0]
        first = d.outbox.read_try(entry, 1)
        assert first.error == "HTTP 500" and first.retry_at == pytest.approx(first.ended_at + 1.0)
        d.run_pass()  # too early for attempt 2
        assert len(hook.calls) == 1
        wait_for(lambda: d.run_pass() or len(hook.calls) == 2, 10, 0.05, "attempt 2")
        assert d.outbox.read_try(entry, 2).error == "HTTP 503"
        assert hook.calls[1].arrived - hook.calls[0].arrived >= 1.0
        assert pending(s3_state), "removed after a failed attempt"
        wait_for(lambda: d.run_pass() or len(hook.calls) == 3, 15, 0.05, "attempt 3")
        assert hook.calls[2].arrived - hook.calls[1].arrived >= retry_delay_s(2, 1.0) == 4.0
        assert pending(s3_state) == []
    # The same id and body on every attempt, each signed for its own timestamp.
    assert {c.headers["webhook-id"] for c in hook.calls} == {ev.msg_id}
    assert len({c.body for c in hook.calls}) == 1
    assert all(verify(decode_secret(SECRET), c.headers, c.body) for c in hook.calls)


def test_retries_survive_a_restart(s3_state):
    with Receiver(statuses=(500, 204)) as hook:
        before = dispatcher(s3_state, retry_base_s=1.5)
        before.enqueue(event(hook.url))
        before.run_pass()
        assert len(hook.calls) == 1
        after = dispatcher(s3_state, retry_base_s=1.5)  # a new process: nothing in memory carries over
        assert after.owner != before.owner
        after.run_pass()
        assert len(hook.calls) == 1, "the retry schedule in the store was not honoured"
        wait_for(lambda: after.run_pass() or pending(s3_state) == [], 10, 0.05, "the retry after a restart")
        assert [c.status for c in hook.calls] == [500, 204]
        assert hook.calls[1].arrived - hook.calls[0].arrived >= 1.5


def test_an_abandoned_claim_is_taken_over_when_its_lease_runs_out(s3_state):
    with Receiver() as hook:
        d = dispatcher(s3_state)
        d.enqueue(event(hook.url))
        entry = d.outbox.scan().popitem()[1][0]
        # A replica claims attempt 1 and dies before posting or writing an outcome.
        assert d.outbox.claim(entry, 1, "dead-replica", time.time(), 2.0) is not None
        d.run_pass()
        assert hook.calls == [], "delivered while another replica's lease held"
        wait_for(lambda: d.run_pass() or pending(s3_state) == [], 10, 0.05, "the takeover")
        assert len(hook.calls) == 1


def test_two_replicas_deliver_each_event_once(state):
    hooks = [Receiver(delay_s=0.02) for _ in range(3)]
    replicas = [dispatcher(state), dispatcher(state)]
    try:
        sent = []
        for i in range(30):
            ev = event(hooks[i % 3].url)
            replicas[i % 2].enqueue(ev)
            sent.append(ev.msg_id)
        for r in replicas:
            r.start()
        wait_for(lambda: pending(state) == [], 60, 0.1, "every event delivered")
    finally:
        for r in replicas:
            r.stop()
        for h in hooks:
            h.close()
    delivered = [i for h in hooks for i in h.ids()]
    assert sorted(delivered) == sorted(sent), "an event was delivered twice or not at all"


def test_a_slow_endpoint_does_not_delay_another(state):
    with Receiver() as slow, Receiver() as fast:
        d = dispatcher(state, timeout_s=10.0)
        d.start()
        try:
            slow.hold()
            d.enqueue(event(slow.url))
            wait_for(lambda: slow.calls, 5, 0.02, "the slow endpoint's request")
            d.enqueue(event(fast.url))
            wait_for(lambda: fast.ids(204), 2, 0.02, "the other endpoint's delivery while the slow one hangs")
            assert slow.ids(204) == []
            slow.release()
            wait_for(lambda: pending(state) == [], 10, 0.05, "the slow endpoint's delivery")
        finally:
            d.stop()


def test_the_last_failed_attempt_drops_the_event(state):
    metrics = Metrics()
    with Receiver(statuses=(500,)) as hook:
        d = dispatcher(state, max_attempts=2, retry_base_s=0.1, metrics=metrics)
        d.enqueue(event(hook.url))
        wait_for(lambda: d.run_pass() or pending(state) == [], 5, 0.05, "the event dropped")
        assert len(hook.calls) == 2
    text = metrics.render().decode()
    assert 'lathe_webhooks_total{outcome="failed"} 2.0' in text and 'outcome="dropped"} 1.0' in text


def test_queueing_one_webhook_id_twice_keeps_one_entry(state):
    outbox = Outbox(state)
    ev = event("https://example.com/h")
    assert outbox.put(ev, time.time()) is True
    assert outbox.put(ev, time.time()) is False
    assert [len(v) for v in outbox.scan().values()] == [1]


def test_a_private_destination_is_dropped_unsent(state):
    with Receiver() as hook:
        d = dispatcher(state, allow_private=False)
        d.enqueue(event(hook.url))
        d.run_pass()
        assert hook.calls == [] and pending(state) == []


def test_orphaned_tries_are_cleaned_up(state):
    outbox = Outbox(state)
    ev = event("https://example.com/h")
    outbox.put(ev, time.time())
    entry = outbox.scan().popitem()[1][0]
    outbox.claim(entry, 1, "r", time.time(), 30)
    state.delete(f"webhooks/{entry.key(EVENT_KEY)}")  # a replica removed the event, then died
    dispatcher(state).run_pass()
    assert pending(state) == [], try_name(1)


def test_a_slow_tenant_endpoint_does_not_delay_another_tenants_webhook(client_factory, bucket):
    """Through the API: acme's receiver hangs on its job's webhook; other's job finishes meanwhile and
    its webhook arrives while acme's is still held."""
    with Receiver() as slow, Receiver() as fast:
        slow.hold()
        client = client_factory(webhook_secret=SECRET, webhook_allow_private=True, webhook_timeout_s=30.0)
        a = client.post("/v1/jobs", json={"spec": spec(bucket), "webhook_url": slow.url}, headers=auth("acme"))
        wait_for(lambda: slow.calls, 30, 0.05, "acme's webhook request")
        b = client.post("/v1/jobs", json={"spec": spec(bucket), "webhook_url": fast.url}, headers=auth("other"))
        b_id = b.json()["id"]
        wait_phase(client, b_id, "succeeded", tenant="other")
        wait_for(lambda: fast.ids(204), 10, 0.05, "other's webhook while acme's receiver hangs")
        assert fast.ids(204) == [f"{b_id}-succeeded-1"] and slow.ids(204) == []
        slow.release()
        wait_for(lambda: slow.ids(204), 10, 0.05, "acme's webhook once its receiver answers")
        assert slow.ids(204) == [f"{a.json()['id']}-succeeded-1"]


def test_a_finished_job_whose_webhook_was_never_queued_gets_it_queued(client_factory, bucket):
    """A reconciler that died between recording a job's end and queueing its webhook: the next pass
    (the job still holds its slot) queues it, once."""
    client = client_factory(webhook_allow_private=True, reconcile_interval_s=0)
    services = client.app.state.services
    url = "http://127.0.0.1:9/hook"
    job_id = client.post("/v1/jobs", json={"spec": spec(bucket), "webhook_url": url}, headers=auth()).json()["id"]
    record = services.store.read_record("acme", job_id)
    record.state, record.final_phase, record.finished_at = "finished", "succeeded", record.submitted_at
    services.store.write_record(record)
    services.reconciler.tick()
    services.reconciler.tick()
    [entries] = Outbox(services.store.root).scan().values()
    assert [e.msg_id for e in entries] == [f"{job_id}-succeeded-0"]
    assert services.store.read_record("acme", job_id).webhooks_queued == ["succeeded@0"]
