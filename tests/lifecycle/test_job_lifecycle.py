"""A whole job against the local S3 server, and the failures GPU clusters produce every day.

Every test runs the real `python -m trainer run s3://…/spec.json` in a subprocess on a tiny SD1.5
pipeline, so imports, S3 transfers, checkpoints and publishing are all the production code paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import tarfile
import zipfile

import pytest
from safetensors import safe_open

from tests.lifecycle.lifecycle_helpers import (
    finish, kill, make_spec, put_spec, read_json, s3_client, start_trainer, trainer_env, wait_for,
)

pytestmark = pytest.mark.slow


def _status(endpoint, bucket, job):
    return read_json(endpoint, bucket, f"tenants/t1/jobs/{job}/status.json") or {}


def _check_outputs(endpoint, bucket, job, steps):
    client = s3_client(endpoint)
    meta = read_json(endpoint, bucket, f"tenants/t1/jobs/{job}/output/metadata.json")
    assert meta is not None, "metadata.json (the commit marker) is missing"
    assert meta["steps"] == steps
    names = {o["name"]: o for o in meta["outputs"]}
    assert "tiny.safetensors" in names and "tiny-shrunk.safetensors" in names
    for name, entry in names.items():
        body = client.get_object(Bucket=bucket, Key=f"tenants/t1/jobs/{job}/output/{name}")["Body"].read()
        assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"], name
    final = client.get_object(Bucket=bucket, Key=f"tenants/t1/jobs/{job}/output/tiny.safetensors")["Body"].read()
    return meta, final


def _ss_steps(data: bytes, tmp_path) -> str:
    path = tmp_path / "check.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        assert any(k.startswith("lora_unet_") for k in fh.keys())
    return meta["ss_steps"]


def test_whole_job_from_spec_to_metadata(s3_server, job_bucket, tmp_path):
    uri = put_spec(s3_server, job_bucket, "j-whole", make_spec(job_bucket))
    proc = start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "work")
    code, out = finish(proc)
    assert code == 0, out[-4000:]
    status = _status(s3_server, job_bucket, "j-whole")
    assert status["phase"] == "succeeded" and status["progress"]["step"] == 6
    meta, final = _check_outputs(s3_server, job_bucket, "j-whole", 6)
    # The plan's epochs reach the status, and the last step reports the last of them.
    assert status["progress"]["epoch"] == status["progress"]["total_epochs"] == meta["epochs"] >= 1
    assert _ss_steps(final, tmp_path) == "6"
    assert meta["shrink_report"] is not None
    # No machine paths: the shrink report names the job's own files and the spec's model URI.
    assert meta["shrink_report"]["input"] == "tiny.safetensors" and meta["shrink_report"]["output"] == "tiny-shrunk.safetensors"
    assert meta["shrink_report"]["base"] == f"s3://{job_bucket}/models/tiny-sd1" and str(tmp_path) not in json.dumps(meta)
    # Zero-tensor check of every saved adapter; reproducibility: base model and dataset by content.
    assert {"tiny.safetensors", "tiny-shrunk.safetensors", "tiny-step00000003.safetensors"} <= set(meta["zero_tensors"])
    assert meta["zero_tensors"]["tiny.safetensors"]["tensors"] > 0 and meta["zero_tensors"]["tiny.safetensors"]["zero"] == 0
    assert len(meta["base_model_sha256"]) == 64
    body = s3_client(s3_server).get_object(Bucket=job_bucket, Key="tenants/t1/jobs/j-whole/output/dataset-manifest.json")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == meta["dataset_manifest_sha256"]
    (dataset,) = json.loads(body)["datasets"]
    assert dataset["field"] == "dataset.uri" and dataset["files"]
    for entry in dataset["files"]:
        assert entry["key"].startswith("datasets/tiny/") and entry["etag"] and len(entry["sha256"]) == 64
    # intermediate save every 3 steps (sd-scripts' name), TensorBoard events and the trainer log uploaded
    keys = {o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=job_bucket, Prefix="tenants/t1/jobs/j-whole/")["Contents"]}
    assert "tenants/t1/jobs/j-whole/output/tiny-step00000003.safetensors" in keys
    assert "tenants/t1/jobs/j-whole/logs/trainer.log" in keys
    # the stored log (served for finished jobs) ends with the attempt's end, as the process output does
    stored = s3_client(s3_server).get_object(Bucket=job_bucket, Key="tenants/t1/jobs/j-whole/logs/trainer.log")
    last = stored["Body"].read().decode().splitlines()[-2:]
    assert last[0].endswith("job succeeded") and last[1].endswith("phase: succeeded"), last
    assert any("/logs/tensorboard/" in k for k in keys)


# One deterministic point here (the commit window); tests/faults kills at 10 random moments across every phase.
@pytest.mark.parametrize("phase_or_step", ["uploading"])
def test_sigkill_then_rerun_finishes_exactly(s3_server, job_bucket, tmp_path, phase_or_step):
    job = f"j-kill-{phase_or_step}"
    uri = put_spec(s3_server, job_bucket, job, make_spec(job_bucket, **{"training.max_train_steps": 8}))
    proc = start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w1")
    if isinstance(phase_or_step, int):
        wait_for(lambda: (_status(s3_server, job_bucket, job).get("progress") or {}).get("step", 0) >= phase_or_step, timeout_s=240, proc=proc)
    else:
        wait_for(lambda: _status(s3_server, job_bucket, job).get("phase") in (phase_or_step, "succeeded"), timeout_s=240, interval_s=0.05, proc=proc)
    kill(proc)
    proc.wait()
    proc2 = start_trainer(uri, trainer_env(s3_server, tmp_path / "cache", attempt=2), tmp_path / "w2")
    code, out = finish(proc2)
    assert code == 0, out[-4000:]
    meta, final = _check_outputs(s3_server, job_bucket, job, 8)
    assert _ss_steps(final, tmp_path) == "8"
    assert meta["loss"]["history_len"] == 8  # no step trained twice, none skipped
    assert _status(s3_server, job_bucket, job)["attempt"] == 2


def test_sigterm_checkpoints_then_resumes(s3_server, job_bucket, tmp_path):
    job = "j-term"
    # 40 steps: the status this test polls lags the loop by up to a few steps, and a SIGTERM that lands
    # after the last step is (rightly) not a preemption: the trainer just finishes.
    spec = make_spec(job_bucket, **{"training.max_train_steps": 40, "save.checkpoint_every_n_steps": 100})
    uri = put_spec(s3_server, job_bucket, job, spec)
    proc = start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w1")
    wait_for(lambda: (_status(s3_server, job_bucket, job).get("progress") or {}).get("step", 0) >= 2, timeout_s=240, proc=proc)
    kill(proc, signal.SIGTERM)
    code, out = finish(proc, timeout=60)
    assert code == 20, out[-4000:]  # preempted: retryable
    status = _status(s3_server, job_bucket, job)
    assert status["error"]["reason"] == "preempted"
    listing = s3_client(s3_server).list_objects_v2(Bucket=job_bucket, Prefix=f"tenants/t1/jobs/{job}/checkpoints/")
    manifests = [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith("manifest.json")]
    assert manifests, "SIGTERM must leave a valid checkpoint"
    proc2 = start_trainer(uri, trainer_env(s3_server, tmp_path / "cache", attempt=2), tmp_path / "w2")
    code, out = finish(proc2)
    assert code == 0, out[-4000:]
    meta, _ = _check_outputs(s3_server, job_bucket, job, 40)
    assert meta["loss"]["history_len"] == 40


def _put(endpoint, bucket, key, body):
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=body)


def test_bad_archive_is_dataset_invalid_naming_the_member(s3_server, job_bucket, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("1_cat/ok.txt", "a cat")
        zf.writestr("../../escape.png", b"x")
    _put(s3_server, job_bucket, "datasets/evil.zip", buf.getvalue())
    uri = put_spec(s3_server, job_bucket, "j-evil", make_spec(job_bucket, **{"dataset.uri": f"s3://{job_bucket}/datasets/evil.zip"}))
    code, out = finish(start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w"))
    assert code == 11, out[-3000:]
    status = _status(s3_server, job_bucket, "j-evil")
    assert status["phase"] == "failed" and status["error"]["reason"] == "dataset_invalid"
    assert "escape.png" in status["error"]["message"]


def test_tar_with_symlink_is_refused(s3_server, job_bucket, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("1_cat/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    _put(s3_server, job_bucket, "datasets/link.tar", buf.getvalue())
    uri = put_spec(s3_server, job_bucket, "j-link", make_spec(job_bucket, **{"dataset.uri": f"s3://{job_bucket}/datasets/link.tar"}))
    code, out = finish(start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w"))
    assert code == 11, out[-3000:]
    assert "link.png" in _status(s3_server, job_bucket, "j-link")["error"]["message"]


def test_bad_image_is_reported_not_fatal(s3_server, job_bucket, tmp_path):
    _put(s3_server, job_bucket, "datasets/tiny/1_extra/broken.png", b"\x89PNG\r\n\x1a\nnot really")
    uri = put_spec(s3_server, job_bucket, "j-broken", make_spec(job_bucket, **{"training.max_train_steps": 2, "shrink.enabled": False}))
    code, out = finish(start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w"))
    # a corrupt image is either refused up front (dataset_invalid, naming it) or skipped with a warning naming it
    status = _status(s3_server, job_bucket, "j-broken")
    if code == 0:
        assert any("broken.png" in w for w in status["warnings"]), status["warnings"]
    else:
        assert code == 11 and "broken.png" in status["error"]["message"]


def test_spec_invalid_exit_code(s3_server, job_bucket, tmp_path):
    spec = make_spec(job_bucket)
    spec["network"]["algo"] = "nope"
    uri = put_spec(s3_server, job_bucket, "j-badspec", spec)
    code, _ = finish(start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w"))
    assert code == 10
    status = _status(s3_server, job_bucket, "j-badspec")
    assert status["error"]["reason"] == "spec_invalid" and "network.algo" in status["error"]["message"]


def test_rerun_on_changed_bytes_fails_dataset_changed_naming_the_file(s3_server, job_bucket, tmp_path):
    client = s3_client(s3_server)
    listing = client.list_objects_v2(Bucket=job_bucket, Prefix="datasets/tiny/")["Contents"]
    files = [{"key": o["Key"], "size": o["Size"], "etag": o["ETag"].strip('"'), "sha256": "0" * 64} for o in listing]
    real = {o["Key"]: hashlib.sha256(client.get_object(Bucket=job_bucket, Key=o["Key"])["Body"].read()).hexdigest()
            for o in listing}
    for entry in files[1:]:
        entry["sha256"] = real[entry["key"]]  # only the first file's bytes "changed" since the earlier job
    key = "tenants/t1/jobs/j-earlier/output/dataset-manifest.json"
    client.put_object(Bucket=job_bucket, Key=key, Body=json.dumps({"version": 1, "datasets": [
        {"field": "dataset.uri", "uri": f"s3://{job_bucket}/datasets/tiny", "files": files}]}).encode())
    spec = make_spec(job_bucket, **{"dataset.expect_manifest": f"s3://{job_bucket}/{key}"})
    uri = put_spec(s3_server, job_bucket, "j-rerun", spec)
    code, out = finish(start_trainer(uri, trainer_env(s3_server, tmp_path / "cache"), tmp_path / "w"))
    assert code == 15, out[-3000:]
    status = _status(s3_server, job_bucket, "j-rerun")
    assert status["error"]["reason"] == "dataset_changed"
    assert f"{files[0]['key']}: changed" in status["error"]["message"] and files[1]["key"] not in status["error"]["message"]
