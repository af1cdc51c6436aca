"""The service as deployed (`python -m service.cli serve`) SIGKILLed between queueing a webhook and
delivering it: the job's terminal webhook is in flight (its receiver holds the request) when the process
dies. A new process on the same state must deliver it, under the same webhook-id, once its lease runs out.
"""

from __future__ import annotations

import time

import pytest

from service.client import Client
from service.dev.stack import free_port
from service.reconcile.webhooks import decode_secret, verify
from tests.common_helpers import wait_for
from tests.faults.fault_helpers import TOKEN, ServiceProcess, s3_client, service_env, service_spec
from tests.service.webhook_receiver import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _outbox(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix="state/webhooks/")
    return [o["Key"].rsplit("/", 1)[1] for o in listing.get("Contents", [])]


def test_a_webhook_in_flight_when_the_service_is_killed_is_delivered_after_restart(
        s3_server, service_bucket, tokens_file, tmp_path):
    env = service_env(f"s3://{service_bucket}/state/", tokens_file, tmp_path, s3_server,
                      LATHE_WEBHOOK_ALLOW_PRIVATE="true", LATHE_WEBHOOK_SECRET=SECRET,
                      LATHE_WEBHOOK_TIMEOUT_S="2", LATHE_WEBHOOK_RETRY_BASE_S="0.2")
    with Receiver() as hook:
        hook.hold()
        service = ServiceProcess(env, free_port()).start()
        try:
            with Client(service.url, TOKEN) as client:
                job = client.submit(service_spec(service_bucket, name="hooked"), webhook_url=hook.url)["id"]
            wait_for(lambda: hook.calls, 60, 0.02, "the webhook request")
            assert "event.json" in _outbox(s3_server, service_bucket), "the event is not in the outbox"
            service.kill()  # the receiver still holds the request: nothing was delivered
        finally:
            service.stop()
        killed_at = time.monotonic()
        held = len(hook.calls)
        hook.release()  # from now on it answers 204 (the held requests' senders are gone)
        restarted = ServiceProcess(env, free_port()).start()
        try:
            wait_for(lambda: len(hook.calls) > held and hook.calls[-1].status, 60, 0.1, "the webhook after the restart")
            wait_for(lambda: _outbox(s3_server, service_bucket) == [], 10, 0.1, "the outbox emptied")
        finally:
            restarted.stop()
    delivered = hook.calls[held:]
    assert [(c.headers["webhook-id"], c.status) for c in delivered] == [(f"{job}-succeeded-1", 204)]
    assert verify(decode_secret(SECRET), delivered[0].headers, delivered[0].body)
    assert {c.body for c in hook.calls} == {delivered[0].body}, "a retry changed the body"
    print(f"webhook delivered {delivered[0].arrived - killed_at:.1f} s after the kill "
          f"(lease of the killed attempt: 3 × 2 s + 5 s)")
