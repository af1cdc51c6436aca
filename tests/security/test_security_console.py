"""The web console's routes and the API routes it reads: a strict CSP on every /ui/ answer, metrics,
details and file downloads under the same tenancy as every job route (404 for another tenant's job,
no path outside the job's listed outputs), and a pasted sd-scripts command that names a server path
refused before anything reads it."""

from __future__ import annotations

import json

import pytest

from tests.security.security_helpers import auth, spec, wait_for

UI_PATHS = ["/ui/", "/ui", "/ui/index.html", "/ui/console.css", "/ui/js/main.js", "/ui/js/job.js"]


@pytest.mark.parametrize("path", UI_PATHS)
def test_every_console_answer_carries_a_strict_csp(sec_client, path):
    r = sec_client().get(path)
    assert r.status_code == 200, (path, r.status_code)
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/ui/../service/api/app.py", "/ui/%2e%2e/pyproject.toml", "/ui/routes.py",
                                  "/ui/js/../../routes.py", "/ui/nothing.js"])
def test_console_serves_its_own_files_only(sec_client, path):
    assert sec_client().get(path).status_code == 404


def _finished_job(api, sec_s3, sec_bucket):
    r = api.post("/v1/jobs", json={"spec": spec(sec_bucket, name="succeed")}, headers=auth("acme"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}", headers=auth()).json())["phase"] == "succeeded" and j,
                   60, what="succeeded")
    key = api.app.state.services.store.job_dir("acme", job_id).uri("metrics.jsonl").split("/", 3)[3]
    lines = [{"step": s, "epoch": 1, "loss": 1.0 / s, "lr": 1e-4, "time": 0.0} for s in (1, 2, 3)]
    sec_s3.put_object(Bucket=sec_bucket, Key=key, Body="".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    return job_id, job


def test_metrics_details_and_files_keep_tenancy(sec_client, sec_s3, sec_bucket):
    api = sec_client()
    job_id, job = _finished_job(api, sec_s3, sec_bucket)
    metrics = api.get(f"/v1/jobs/{job_id}/metrics", headers=auth()).json()
    assert [p["step"] for p in metrics["points"]] == [1, 2, 3]  # the torn last line is skipped
    assert api.get(f"/v1/jobs/{job_id}/details", headers=auth()).status_code == 200
    out = job["outputs"][0]
    r = api.get(f"/v1/jobs/{job_id}/files/{out['name']}", headers=auth())
    assert r.status_code == 200 and len(r.content) == out["size"], (r.status_code, r.text)
    assert r.headers["x-content-type-options"] == "nosniff" and "sandbox" in r.headers["content-security-policy"]
    for path in (f"/v1/jobs/{job_id}/metrics", f"/v1/jobs/{job_id}/details", f"/v1/jobs/{job_id}/files/{out['name']}"):
        for tenant in ("acme-evil", "other"):
            r = api.get(path, headers=auth(tenant))
            assert r.status_code == 404 and r.json()["detail"] == f"no job '{job_id}'", (path, tenant, r.text)
        assert api.get(path).status_code == 401
    for name in ("../job.json", "..%2Fjob.json", "status.json", "spec.json/../job.json", "%2e%2e/job.json"):
        r = api.get(f"/v1/jobs/{job_id}/files/{name}", headers=auth())
        assert r.status_code == 404, (name, r.status_code, r.text)


@pytest.mark.parametrize("text, flag", [
    ("accelerate launch train_network.py --pretrained_model_name_or_path=s3://b/m --dataset_config /etc/passwd",
     "--dataset_config"),
    ("python train_network.py --sample_prompts=/etc/lathe/credentials --train_data_dir=s3://b/d", "--sample_prompts"),
    ("accelerate launch sdxl_train_network.py --config_file ../../tokens.json", "--config_file"),
    ('pretrained_model_name_or_path = "s3://b/m"\ndataset_config = "/etc/shadow"\n', "--dataset_config"),
])
def test_convert_refuses_flags_that_name_server_files(sec_client, monkeypatch, text, flag):
    from pathlib import Path

    def no_reads(*args, **kwargs):
        raise AssertionError(f"the conversion opened a file: {args[:1]}")

    monkeypatch.setattr(Path, "read_text", no_reads)
    monkeypatch.setattr(Path, "is_file", no_reads)
    r = sec_client().post("/v1/specs:convert", json={"text": text}, headers=auth())
    assert r.status_code == 422, r.text
    body = r.json()
    assert flag in body["detail"] and [p["path"] for p in body["problems"]] == [flag]


def test_convert_reads_a_command_without_touching_the_disk(sec_client, monkeypatch, tmp_path):
    from pathlib import Path

    (tmp_path / "5_cat").mkdir()
    monkeypatch.setattr(Path, "iterdir", lambda self: (_ for _ in ()).throw(AssertionError("listed a folder")))
    text = (f"accelerate launch train_network.py --pretrained_model_name_or_path=s3://b/m --train_data_dir={tmp_path} "
            "--output_dir=s3://b/out --network_module=networks.lora --network_dim 8 --max_train_epochs 2")
    r = sec_client().post("/v1/specs:convert", json={"text": text}, headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "kohya" and r.json()["spec"]["network"]["dim"] == 8
    assert sec_client().post("/v1/specs:convert", json={"text": text}).status_code == 401
