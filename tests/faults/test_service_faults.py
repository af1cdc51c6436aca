"""The service as deployed (`python -m service.cli serve`, its own process) under faults: SIGKILLed
while submits are in flight and restarted, and 50 concurrent submits with one Idempotency-Key.

Trainers are the stand-in (tests/service/fake_trainer.py): what is under test is the submit path and
the state it leaves in the object store, not training.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import httpx
import msgspec
import pytest

from service.client import Client
from service.dev.stack import free_port
from service.state.jobstore import IdempotencyRecord, JobStore, new_job_id
from service.api.wire import JobCreate
from tests.common_helpers import wait_for
from tests.faults.fault_helpers import (
    TENANT, TOKEN, ServiceProcess, fault_rng, s3_client, service_env, service_spec, soak,
)
from trainer.core.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(600, 60 * soak(2)))]
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
PER_ROUND = 6  # submits in flight when the service is killed (each job then runs the stand-in trainer)


def _all_jobs(url: str) -> list[dict]:
    items, cursor = [], None
    with httpx.Client(headers=HEADERS, timeout=30) as http:
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = http.get(f"{url}/v1/jobs", params=params).json()
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items


def _keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"][len(prefix):] for o in listing.get("Contents", [])]


def test_service_killed_mid_submit_loses_and_duplicates_nothing(s3_server, service_bucket, tokens_file, tmp_path):
    rng, seed = fault_rng("service kill")
    state = f"s3://{service_bucket}/state/"
    service = ServiceProcess(service_env(state, tokens_file, tmp_path, s3_server), free_port())
    t0 = time.monotonic()
    service.start()
    expected: dict[str, str] = {}   # idempotency key → job id the client ended up with
    answered: dict[str, str] = {}   # key → job id answered before the kill (must not change)
    lost_answers = 0
    try:
        # A round of concurrent submits first: how long it takes here sets the window of the kills.
        started = time.monotonic()

        def warm_up(i: int) -> None:
            with Client(service.url, TOKEN) as client:
                key = f"warm-up-{i}"
                expected[key] = client.submit(service_spec(service_bucket, name=key), idempotency_key=key)["id"]

        warmers = [threading.Thread(target=warm_up, args=(i,)) for i in range(PER_ROUND)]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join(120)
        latency = time.monotonic() - started
        assert len(expected) == PER_ROUND, expected
        print(f"service kill: started in {started - t0:.1f} s, {PER_ROUND} concurrent submits take {latency:.2f} s")
        for round_ in range(soak(2)):
            keys = [f"kill-{seed}-{round_}-{i}" for i in range(PER_ROUND)]
            bodies = {k: {"spec": service_spec(service_bucket, name=k)} for k in keys}
            results: dict[str, object] = {}

            def send(key: str, delay: float) -> None:
                time.sleep(delay)
                try:
                    resp = httpx.post(f"{service.url}/v1/jobs", json=bodies[key],
                                      headers={**HEADERS, "Idempotency-Key": key}, timeout=30)
                    results[key] = resp
                except httpx.HTTPError as exc:
                    results[key] = exc

            # Submits spread over about one submit's time and a SIGKILL in or after that window: some are
            # answered, some cut at a random point of the submit path (key, slot, spec, index, job.json).
            threads = [threading.Thread(target=send, args=(k, rng.uniform(0, latency))) for k in keys]
            for t in threads:
                t.start()
            # Early in even rounds (most submits cut), late in odd ones (most answered, some cut).
            time.sleep(rng.uniform(0.2, 1.0) * latency if round_ % 2 == 0 else rng.uniform(1.0, 2.0) * latency)
            service.kill()
            for t in threads:
                t.join(60)
            killed_at = time.monotonic()
            for key, result in results.items():
                if isinstance(result, httpx.Response) and result.status_code in (200, 201):
                    answered[key] = result.json()["id"]
                else:
                    lost_answers += 1
            service.start()
            restarted = time.monotonic()
            with Client(service.url, TOKEN) as client:  # the client retries with the same keys
                for key in keys:
                    job = client.submit(bodies[key]["spec"], idempotency_key=key, retry_s=60)
                    expected[key] = job["id"]
                    if key in answered:
                        assert job["id"] == answered[key], f"seed {seed}: key {key} now names another job"
            print(f"service kill: round {round_}: restart {restarted - killed_at:.1f} s, "
                  f"retries {time.monotonic() - restarted:.1f} s")
        adopted = service.log.read_text().count("finishing the submit of a request that died")
        print(f"service kill: {len(expected)} submits, {lost_answers} answers cut by the kill, {adopted} of them "
              f"after the key was claimed but before the job was written ({time.monotonic() - t0:.1f} s)")

        # A submit that died right after claiming its key (and a slot), before creating the job: the
        # retry creates that very job, once (the deterministic version of the worst kill moment).
        store = JobStore(open_store(state))
        reserved = new_job_id(time.time() - 60)
        key = f"dead-{uuid.uuid4().hex[:8]}"
        body = {"spec": service_spec(service_bucket, name="dead-submit")}
        body_hash = hashlib.sha256(msgspec.json.encode(msgspec.convert(body, JobCreate), order="sorted")).hexdigest()
        assert store.claim_idempotency(TENANT, JobStore.key_hash(key), IdempotencyRecord(
            job_id=reserved, body_sha256=body_hash, created_at=time.time() - 60))
        assert store.claim_slot(TENANT, reserved, 64)
        with Client(service.url, TOKEN) as client:
            job = client.submit(body["spec"], idempotency_key=key, retry_s=60)
            again = client.submit(body["spec"], idempotency_key=key, retry_s=60)
        assert job["id"] == again["id"] == reserved, (job["id"], again["id"], reserved)
        expected[key] = reserved

        # No lost job, no duplicate: the list holds exactly the clients' jobs, each runs to the end,
        # and every concurrency slot is given back.
        listed = _all_jobs(service.url)
        ids = [j["id"] for j in listed]
        assert len(ids) == len(set(ids)), f"seed {seed}: a job is listed twice"
        assert set(ids) == set(expected.values()), (
            f"seed {seed}: listed but not submitted {set(ids) - set(expected.values())}, "
            f"submitted but not listed {set(expected.values()) - set(ids)}")
        assert len(set(expected.values())) == len(expected), f"seed {seed}: two keys got the same job"

        def all_finished() -> bool:
            jobs = _all_jobs(service.url)
            return all(j["phase"] in ("succeeded", "failed", "cancelled") for j in jobs) and jobs

        wait_for(all_finished, 180, 0.2, "every job to finish")
        print(f"service kill: all {len(expected)} jobs finished ({time.monotonic() - t0:.1f} s)")
        phases = {j["id"]: j["phase"] for j in _all_jobs(service.url)}
        assert set(phases.values()) == {"succeeded"}, phases
        wait_for(lambda: not _keys(s3_server, service_bucket, f"state/tenants/{TENANT}/slots/"), 30, 0.2,
                 "every concurrency slot to be released")
    finally:
        service.stop()


def test_concurrent_submits_with_one_key_create_one_job(s3_server, service_bucket, tokens_file, tmp_path):
    state = f"s3://{service_bucket}/state-50/"
    service = ServiceProcess(service_env(state, tokens_file, tmp_path, s3_server, LATHE_LAUNCHER="none"),
                             free_port()).start()
    body = {"spec": service_spec(service_bucket, name="fifty")}
    key = f"fifty-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(50)
    results: list[httpx.Response | Exception] = []

    def send() -> None:
        with httpx.Client(timeout=120) as http:
            barrier.wait()
            try:
                results.append(http.post(f"{service.url}/v1/jobs", json=body,
                                         headers={**HEADERS, "Idempotency-Key": key}))
            except httpx.HTTPError as exc:
                results.append(exc)

    try:
        threads = [threading.Thread(target=send) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        codes = sorted(r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results)
        assert len(results) == 50 and all(c in (200, 201) for c in codes), codes
        assert codes.count(201) == 1, codes
        assert len({r.json()["id"] for r in results}) == 1
        listed = _all_jobs(service.url)
        assert [j["id"] for j in listed] == [results[0].json()["id"]]
        assert len(_keys(s3_server, service_bucket, f"state-50/tenants/{TENANT}/slots/")) == 1
    finally:
        service.stop()
