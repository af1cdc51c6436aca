"""Tenant isolation on every endpoint, and idempotent submits under concurrent duplicates."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.conftest import TOKENS, auth, spec


@pytest.fixture
def api(client_factory):
    return client_factory(launcher="none", reconcile_interval_s=0)


def test_other_tenants_jobs_are_404_on_every_endpoint(api, bucket):
    job_id = api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth("acme")).json()["id"]
    other = auth("other")
    for method, url in [("get", f"/v1/jobs/{job_id}"), ("post", f"/v1/jobs/{job_id}/cancel"),
                        ("delete", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}/logs"),
                        ("get", f"/v1/jobs/{job_id}/events")]:
        r = getattr(api, method)(url, headers=other)
        assert r.status_code == 404, (method, url, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert job_id in r.json()["detail"]  # the same answer as for a job that never existed
    assert api.get("/v1/jobs", headers=other).json()["items"] == []
    assert [j["id"] for j in api.get("/v1/jobs", headers=auth("acme")).json()["items"]] == [job_id]
    # The owner still sees it untouched (the other tenant's cancel did nothing).
    assert api.get(f"/v1/jobs/{job_id}", headers=auth("acme")).json()["cancel_requested"] is False


def test_a_tenant_cannot_point_at_another_tenants_area(api, bucket):
    state = api.app.state.services.store.root.root_uri
    body = {"spec": spec(bucket, **{"dataset.uri": f"{state}tenants/other/datasets/x"})}
    r = api.post("/v1/jobs", json=body, headers=auth("acme"))
    assert r.status_code == 422 and r.json()["problems"][0]["path"] == "dataset.uri"


def test_uploads_are_presigned_under_the_tenants_prefix(api, bucket, s3):
    body = {"dataset": "mine", "files": [{"path": "1_cat/a.png", "content_type": "image/png"}, {"path": "1_cat/a.txt"}]}
    grant = api.post("/v1/uploads", json=body, headers=auth("acme")).json()
    assert grant["dataset_uri"].endswith("/tenants/acme/datasets/mine/")
    for target, data in zip(grant["files"], [b"\x89PNG fake", b"a cat"]):
        assert httpx.put(target["url"], content=data, headers=target["headers"]).status_code == 200
    key = grant["files"][1]["uri"].split(f"s3://{bucket}/", 1)[1]
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"a cat"
    bad = {"dataset": "mine", "files": [{"path": "1_cat/../../../other/x.png"}]}
    assert api.post("/v1/uploads", json=bad, headers=auth("acme")).status_code == 400


def test_idempotency_key_same_body_same_job_other_body_conflict(api, bucket):
    headers = {**auth("acme"), "Idempotency-Key": "run-42"}
    first = api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=headers)
    again = api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    conflict = api.post("/v1/jobs", json={"spec": spec(bucket, **{"training.max_train_steps": 9})}, headers=headers)
    assert conflict.status_code == 409 and first.json()["id"] in conflict.json()["detail"]
    # Keys are per tenant: the same key elsewhere is a different job.
    other = api.post("/v1/jobs", json={"spec": spec(bucket)}, headers={**auth("other"), "Idempotency-Key": "run-42"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_concurrent_duplicate_submits_create_one_job(live_server_factory, bucket):
    server = live_server_factory(use_launcher=False, launcher="none", reconcile_interval_s=0)
    headers = {"Authorization": f"Bearer {TOKENS['acme']}", "Idempotency-Key": "burst-1"}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/jobs", json={"spec": spec(bucket)}, headers=headers, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.status_code == 201 for r in responses) == 1
    listed = httpx.get(f"{server.url}/v1/jobs", headers=headers).json()["items"]
    assert len(listed) == 1
    # The losers released their concurrency slots: two more jobs fit under max_concurrent_jobs = 3.
    for key in ("a", "b"):
        r = httpx.post(f"{server.url}/v1/jobs", json={"spec": spec(bucket)}, headers={**headers, "Idempotency-Key": key})
        assert r.status_code == 201, r.text
