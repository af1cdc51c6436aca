"""Tenant isolation beyond tests/service/test_api_tenancy.py (which covers a queued job, every endpoint
and idempotency keys): a running and then finished job with outputs, the SSE stream while it runs and
on resume, prefix look-alike tenant names (`acme` / `acme-evil`) on every URI field, and a delete that
must not follow a status.json pointing into another tenant's area."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.security.security_helpers import TOKENS, auth, spec, wait_for

OTHERS = [t for t in TOKENS if t != "acme"]


def _not_found(resp: Any, job_id: str) -> None:
    assert resp.status_code == 404, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["detail"] == f"no job '{job_id}'"  # what a job that never existed looks like


def _probe_as(api: Any, tenant: str, job_id: str) -> None:
    """Every per-job endpoint, as `tenant`, answers exactly as for a job that does not exist."""
    headers = auth(tenant)
    for method, path, extra in [
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("GET", f"/v1/jobs/{job_id}/logs", {}),
        ("GET", f"/v1/jobs/{job_id}/events", {}),
        ("GET", f"/v1/jobs/{job_id}/events", {"Last-Event-ID": "0"}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {}),
        ("DELETE", f"/v1/jobs/{job_id}", {}),
    ]:
        _not_found(api.request(method, path, headers={**headers, **extra}), job_id)
    listed = api.get("/v1/jobs", headers=headers).json()["items"]
    assert job_id not in {j["id"] for j in listed}
    for phase in ("queued", "training", "succeeded"):
        assert job_id not in {j["id"] for j in api.get(f"/v1/jobs?status={phase}", headers=headers).json()["items"]}


def test_a_running_then_finished_job_is_invisible_to_other_tenants(sec_client, sec_bucket, sec_s3):
    api = sec_client()
    r = api.post("/v1/jobs", json={"spec": spec(sec_bucket, name="succeed", **{"training.max_train_steps": 60})},
                 headers=auth("acme"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: api.get(f"/v1/jobs/{job_id}", headers=auth()).json()["phase"] == "training", 60, what="training")
    for tenant in OTHERS:  # while it runs: no stream, no cancel
        _probe_as(api, tenant, job_id)

    # The owner's stream: events up to the terminal phase, then the stream ends.
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth("acme")) as stream:
        assert stream.status_code == 200
        text = "".join(stream.iter_text())
    assert '"phase":"succeeded"' in text and job_id in text
    job = wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}", headers=auth()).json()).get("finished_at") and j,
                   60, what="finished")
    assert job["phase"] == "succeeded" and job["outputs"], job
    store = api.app.state.services.store  # and recorded in job.json (the snapshot below must not move)
    wait_for(lambda: store.read_record("acme", job_id).final_phase, 30, what="the end recorded")
    stored_before = _objects(sec_s3, sec_bucket, job["job_uri"])

    for tenant in OTHERS:  # once finished: no logs, no delete, no resume of the stream
        _probe_as(api, tenant, job_id)
        # Nor can its outputs be named as inputs of another tenant's job.
        weights = next(o["uri"] for o in job["outputs"] if o["name"].endswith(".safetensors"))
        bad = api.post("/v1/jobs:validate", json={"spec": spec(sec_bucket, tenant, **{"network.weights": weights})},
                       headers=auth(tenant))
        assert bad.status_code == 422 and {p["path"] for p in bad.json()["problems"]} == {"network.weights"}

    after = api.get(f"/v1/jobs/{job_id}", headers=auth("acme")).json()
    assert (after["phase"], after["revision"], after["cancel_requested"]) == ("succeeded", job["revision"], False)
    assert _objects(sec_s3, sec_bucket, job["job_uri"]) == stored_before  # nothing deleted or touched
    assert api.get(f"/v1/jobs/{job_id}/logs", headers=auth("acme")).status_code == 200


def _objects(s3: Any, bucket: str, uri: str) -> dict[str, str]:
    prefix = uri.split(f"s3://{bucket}/", 1)[1]
    return {o["Key"]: o["ETag"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in p.get("Contents", [])}


FIELDS = ["model.uri", "model.vae", "network.weights", "dataset.uri", "dataset.reg_uri", "save.output_uri"]


@pytest.mark.parametrize("tenant, victim", [("acme", "acme-evil"), ("acme-evil", "acme"), ("other", "acme")])
def test_no_uri_field_reaches_another_tenants_area(sec_client, sec_bucket, tenant, victim):
    """Each field pointed at the victim's state area or configured prefixes is a 422 naming exactly that
    field: `acme` and `acme-evil` share the start of their names, not their areas."""
    api = sec_client(launcher="none", reconcile_interval_s=0)
    state = api.app.state.services.store.root.root_uri
    targets = [f"{state}tenants/{victim}", f"{state}tenants/{victim}/datasets/x", f"{state}tenants/{victim}/jobs/",
               f"s3://{sec_bucket}/datasets/{victim}/tiny", f"s3://{sec_bucket}/results/{victim}/lora.safetensors",
               f"{state}tenants/{tenant}/../{victim}/x", f"{state}tenants/{tenant}/./../{victim}/"]
    for field in FIELDS:
        for target in targets:
            r = api.post("/v1/jobs:validate", json={"spec": spec(sec_bucket, tenant, **{field: target})},
                         headers=auth(tenant))
            assert r.status_code == 422, (field, target, r.text)
            assert r.json()["type"].endswith("/uri-not-allowed"), r.json()
            assert {p["path"] for p in r.json()["problems"]} == {field}, (field, target, r.json())


def test_outputs_outside_the_tenants_locations_are_neither_presigned_nor_deleted(sec_client, sec_bucket, sec_s3):
    """A status.json listing outputs elsewhere (written by a compromised or buggy trainer) must not hand
    out URLs to another tenant's objects, nor make DELETE remove them."""
    from service.state.jobstore import AttemptRecord, JobRecord, new_job_id
    from trainer.core.jobkeys import STATUS_KEY
    from trainer.core.spec import encode_spec, spec_from_obj
    from trainer.core.status import JobStatus, OutputFile

    api = sec_client(launcher="none", reconcile_interval_s=0)
    store = api.app.state.services.store
    state = store.root.root_uri
    victims = {f"results/other/{uuid.uuid4().hex[:6]}.safetensors": b"other's adapter",
               "datasets/other/tiny/2_cat/0.png": None}
    for key, data in victims.items():
        if data is not None:
            sec_s3.put_object(Bucket=sec_bucket, Key=key, Body=data)
    other_state_key = state.split(f"s3://{sec_bucket}/", 1)[1] + "tenants/other/keep.json"
    sec_s3.put_object(Bucket=sec_bucket, Key=other_state_key, Body=b"{}")
    keys = [*victims, other_state_key]
    before = {k: sec_s3.head_object(Bucket=sec_bucket, Key=k)["ETag"] for k in keys}

    job_id = new_job_id()
    record = JobRecord(job_id=job_id, tenant="acme", submitted_at=1.0, spec_hash="0" * 64, state="finished",
                       final_phase="succeeded", finished_at=2.0, attempt=1,
                       attempts=[AttemptRecord(attempt=1, launched_at=1.5, ended_at=2.0)])
    store.create_job(record, encode_spec(spec_from_obj(spec(sec_bucket))))
    outputs = [OutputFile(name=k.rsplit("/", 1)[1], uri=f"s3://{sec_bucket}/{k}", size=1, sha256="0" * 64)
               for k in keys]
    own = store.job_dir("acme", job_id)
    own.put_bytes("output/mine.safetensors", b"mine")
    outputs.append(OutputFile(name="mine.safetensors", uri=own.uri("output/mine.safetensors"), size=4, sha256="0" * 64))
    own.put_json(STATUS_KEY, JobStatus(phase="succeeded", outputs=outputs))

    # No presigned URL to read them either, only to the job's own output.
    view = api.get(f"/v1/jobs/{job_id}", headers=auth("acme")).json()
    assert {o["name"]: o["url"] is not None for o in view["outputs"]} == {
        **{k.rsplit("/", 1)[1]: False for k in keys}, "mine.safetensors": True}

    assert api.delete(f"/v1/jobs/{job_id}", headers=auth("acme")).status_code == 204
    assert api.get(f"/v1/jobs/{job_id}", headers=auth("acme")).status_code == 404
    assert {k: sec_s3.head_object(Bucket=sec_bucket, Key=k)["ETag"] for k in keys} == before


def test_uploads_are_confined_to_the_tenants_own_area(sec_client, sec_bucket):
    api = sec_client(launcher="none", reconcile_interval_s=0)
    state = api.app.state.services.store.root.root_uri
    for tenant in TOKENS:
        body = {"dataset": "set.1", "files": [{"path": "2_cat/a.png", "content_type": "image/png"},
                                              {"path": "2_cat/..a.txt"}]}
        grant = api.post("/v1/uploads", json=body, headers=auth(tenant)).json()
        own = f"{state}tenants/{tenant}/datasets/set.1/"
        assert grant["dataset_uri"] == own
        assert all(f["uri"].startswith(own) for f in grant["files"]), grant
        path_prefix = "/" + own.split("://", 1)[1]
        assert all(f["url"].split("?")[0].split("/", 3)[3].startswith(path_prefix[1:]) for f in grant["files"]), grant
