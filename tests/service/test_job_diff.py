"""`GET /v1/jobs/{a}/diff/{b}` and `lathe diff`: spec fields, dataset files, model, versions, final loss."""

from __future__ import annotations

from service.cli_jobs import format_diff
from service.jobs.jobdiff import diff_jobs
from tests.service.conftest import auth, spec, wait_phase


def _doc(lr: float, files: list[tuple[str, str]], torch: str, loss: float) -> dict:
    return {
        "spec": {"version": 1, "model": {"uri": "s3://m/sd15"}, "optimizer": {"learning_rate": lr, "args": {}}},
        "metadata": {"base_model_sha256": "a" * 64, "git_commit": "c1", "lathe_version": "0.1",
                     "packages": {"torch": torch, "diffusers": "0.30"}, "loss": {"final_avg": loss}},
        "manifest": {"version": 1, "datasets": [{"field": "dataset.uri", "uri": "s3://d/x/", "files": [
            {"key": key, "size": 1, "etag": sha[:8], "sha256": sha} for key, sha in files]}]},
    }


def test_diff_names_spec_fields_dataset_files_versions_and_loss():
    a = _doc(1e-4, [("x/1_cat/a.png", "1" * 64), ("x/1_cat/b.png", "2" * 64)], "2.13.0", 0.11)
    b = _doc(2e-4, [("x/1_cat/a.png", "9" * 64), ("x/1_cat/c.png", "3" * 64)], "2.14.0", 0.09)
    diff = diff_jobs("j-a", "j-b", a, b)
    assert [(c.path, c.a, c.b) for c in diff.spec] == [("optimizer.learning_rate", 1e-4, 2e-4)]
    assert [(f.key, f.change) for f in diff.dataset] == [
        ("x/1_cat/a.png", "changed"), ("x/1_cat/b.png", "removed"), ("x/1_cat/c.png", "added")]
    assert [(c.path, c.a, c.b) for c in diff.versions] == [("packages.torch", "2.13.0", "2.14.0")]
    assert diff.model == [] and (diff.final_loss.a, diff.final_loss.b) == (0.11, 0.09) and diff.complete
    assert diff_jobs("j-a", "j-a", a, a).spec == [] and diff_jobs("j-a", "j-a", a, a).final_loss is None


def test_diff_endpoint_and_cli_lines_on_two_jobs(client_factory, bucket):
    client = client_factory()
    ids = []
    for steps in (3, 4):
        r = client.post("/v1/jobs", json={"spec": spec(bucket, **{"training.max_train_steps": steps})}, headers=auth())
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for job_id in ids:
        assert wait_phase(client, job_id, {"succeeded", "failed"})["phase"] == "succeeded"
    r = client.get(f"/v1/jobs/{ids[0]}/diff/{ids[1]}", headers=auth())
    assert r.status_code == 200, r.text
    diff = r.json()
    assert [(c["path"], c["a"], c["b"]) for c in diff["spec"]] == [("training.max_train_steps", 3, 4)]
    assert diff["dataset"] == [] and diff["complete"] is True
    lines = format_diff(diff)
    assert lines[:3] == [f"--- {ids[0]}", f"+++ {ids[1]}", "spec: training.max_train_steps: 3 -> 4"]
    assert client.get(f"/v1/jobs/{ids[0]}/diff/j-nope", headers=auth()).status_code == 404
    assert client.get(f"/v1/jobs/{ids[0]}/diff/{ids[1]}", headers=auth("other")).status_code == 404


def test_openapi_names_the_diff_route_the_job_kinds_phases_and_failure_reasons(client_factory):
    doc = client_factory().get("/schema/openapi.json").json()
    assert "/v1/jobs/{job_id}/diff/{other_id}" in doc["paths"]
    text = str(doc)
    assert "adapter_mismatch" in text and "'merging'" in text and "'shrink'" in text and "'merge'" in text


def test_rerun_refuses_a_changed_dataset_naming_the_file_and_force_runs_anyway(client_factory, bucket, s3):
    import json

    from tests.service.conftest import png, upload_tiny_dataset

    data_uri = upload_tiny_dataset(s3, bucket, prefix="datasets/rerun")
    client = client_factory()
    first = client.post("/v1/jobs", json={"spec": spec(bucket, **{"dataset.uri": data_uri})}, headers=auth()).json()
    done = wait_phase(client, first["id"], {"succeeded", "failed"})
    # The manifest the real trainer publishes (the fake one does not): keys, sizes and ETags as listed now.
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="datasets/rerun/")["Contents"]
    manifest = {"version": 1, "datasets": [{"field": "dataset.uri", "uri": data_uri, "files": [
        {"key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"'), "sha256": "0" * 64} for o in listing]}]}
    out_key = done["outputs"][0]["uri"].split(f"{bucket}/", 1)[1].rsplit("/", 1)[0] + "/dataset-manifest.json"
    s3.put_object(Bucket=bucket, Key=out_key, Body=json.dumps(manifest).encode())

    r = client.post(f"/v1/jobs/{first['id']}/rerun", json={}, headers=auth())
    assert r.status_code == 201, r.text
    rerun_spec = json.loads(s3.get_object(Bucket=bucket, Key=r.json()["spec_uri"].split(f"{bucket}/", 1)[1])["Body"].read())
    assert rerun_spec["dataset"]["expect_manifest"] == f"s3://{bucket}/{out_key}"  # the trainer compares sha256

    changed = listing[0]["Key"]
    s3.put_object(Bucket=bucket, Key=changed, Body=png(9, 9))
    r = client.post(f"/v1/jobs/{first['id']}/rerun", json={}, headers=auth())
    assert r.status_code == 409 and r.json()["type"].endswith("dataset-changed"), r.text
    assert changed in r.text and "changed" in r.text
    r = client.post(f"/v1/jobs/{first['id']}/rerun", json={"force": True}, headers=auth())
    assert r.status_code == 201, r.text
    forced = json.loads(s3.get_object(Bucket=bucket, Key=r.json()["spec_uri"].split(f"{bucket}/", 1)[1])["Body"].read())
    assert forced["dataset"]["expect_manifest"] is None
