"""422 for every class of bad spec and for a failed preflight (with field paths), 401, 429, and the
preflight report. The app runs without a launcher: nothing here starts a trainer."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
import zipfile

import pytest

from tests.service.conftest import REPO, auth, png, put, spec, upload_tiny_dataset, zip_dataset


@pytest.fixture
def api(client_factory):
    """An API-only app (no launcher, no reconciler)."""
    return client_factory(launcher="none", reconcile_interval_s=0)


def problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def paths(body: dict) -> set[str]:
    return {p["path"] for p in body.get("problems") or []}


@pytest.mark.parametrize("changes, path, words", [
    ({"network.algo": "nope"}, "network.algo", "allowed values"),
    ({"training.batch_size": "two"}, "training.batch_size", "Expected `int`"),
    ({"training.batch_size": 0}, "training.batch_size", ">= 1"),
    ({"network.network_dim": 8}, "network.network_dim", "unknown field"),
    ({"optimizer_type": "AdamW"}, "optimizer_type", "optimizer.type"),
    ({"model.uri": None}, "model.uri", "required"),
    ({"version": 7}, "version", "unsupported spec version"),
    ({"precision.cache_text_encoder_outputs": True, "dataset.shuffle_caption": True},
     "precision.cache_text_encoder_outputs", "shuffle_caption"),
    ({"scheduler.type": "adafactor"}, "scheduler.type", "Adafactor"),
])
def test_invalid_specs_are_422_with_the_field_path(api, bucket, changes, path, words):
    for endpoint in ("/v1/jobs", "/v1/jobs:validate"):
        body = problem(api.post(endpoint, json={"spec": spec(bucket, **changes)}, headers=auth()), 422)
        assert body["type"].endswith("/invalid-spec")
        assert path in paths(body), body
        assert any(words in p["message"] for p in body["problems"]), body


def test_uris_outside_the_tenant_prefixes_are_422_naming_each_field(api, bucket):
    bad = spec(bucket, **{"model.uri": "s3://elsewhere/models/x", "dataset.reg_uri": f"s3://{bucket}/private/reg",
                          "save.output_uri": f"s3://{bucket}/results/other/"})
    body = problem(api.post("/v1/jobs", json={"spec": bad}, headers=auth()), 422)
    assert paths(body) == {"model.uri", "dataset.reg_uri", "save.output_uri"}
    assert body["type"].endswith("/uri-not-allowed")


@pytest.mark.parametrize("setup, changes, path, words", [
    (None, {"dataset.uri": "s3://{b}/datasets/missing"}, "dataset.uri", "nothing found"),
    ("flat", {"dataset.uri": "s3://{b}/datasets/{u}"}, "dataset.uri", "<repeats>_<concept>"),
    ("broken", {"dataset.uri": "s3://{b}/datasets/{u}"}, "dataset.uri:1_dog/broken.png", "not a readable image"),
    (None, {"dataset.config_toml": "[[datasets]]\nbogus = 1\n"}, "dataset.config_toml", "unknown key 'bogus'"),
    ("evil", {"dataset.uri": "s3://{b}/datasets/{u}.zip"}, "dataset.uri", "outside its root"),
])
def test_failed_preflight_is_422_with_the_report(api, s3, bucket, setup, changes, path, words):
    unique = uuid.uuid4().hex[:8]
    if setup == "flat":
        put(s3, bucket, f"datasets/{unique}/a.png", png(64, 64))
    elif setup == "broken":
        upload_tiny_dataset(s3, bucket, f"datasets/{unique}")
        put(s3, bucket, f"datasets/{unique}/1_dog/broken.png", b"\x89PNG\r\n\x1a\nnot really")
    elif setup == "evil":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("1_cat/a.png", png(64, 64))
            zf.writestr("../escape.png", b"x")
        put(s3, bucket, f"datasets/{unique}.zip", buf.getvalue())
    changes = {k: v.format(b=bucket, u=unique) for k, v in changes.items()}
    body = problem(api.post("/v1/jobs:validate", json={"spec": spec(bucket, **changes)}, headers=auth()), 422)
    assert body["type"].endswith(("/preflight-failed", "/invalid-spec"))
    assert path in paths(body), body
    assert any(words in p["message"] for p in body["problems"]), body


def test_images_over_the_pixel_limit_fail_the_preflight(client_factory, s3, bucket):
    api = client_factory(launcher="none", reconcile_interval_s=0, max_image_pixels=100 * 100)
    uri = upload_tiny_dataset(s3, bucket, "datasets/huge")
    put(s3, bucket, "datasets/huge/1_dog/huge.png", png(300, 300))
    body = problem(api.post("/v1/jobs", json={"spec": spec(bucket, **{"dataset.uri": uri})}, headers=auth()), 422)
    assert "dataset.uri:1_dog/huge.png" in paths(body)
    assert body["preflight"]["images"] == 7


def test_validate_reports_counts_buckets_steps_and_warnings(api, s3, bucket):
    uri = upload_tiny_dataset(s3, bucket, "datasets/extras")
    put(s3, bucket, "datasets/extras/2_cat/orphan.txt", b"no image")
    put(s3, bucket, "datasets/extras/2_cat/notes.pdf", b"%PDF")
    doc = spec(bucket, **{"dataset.uri": uri, "dataset.resolution": 128, "dataset.enable_bucket": True, "dataset.min_bucket_reso": 64,
                          "dataset.max_bucket_reso": 256, "dataset.bucket_reso_steps": 32, "training.max_train_steps": None,
                          "training.max_train_epochs": 3, "training.batch_size": 2})
    r = api.post("/v1/jobs:validate", json={"spec": doc}, headers=auth())
    assert r.status_code == 200, r.text
    result = r.json()
    pre = result["preflight"]
    assert pre["images"] == 6 and pre["image_steps_per_epoch"] == 10
    assert pre["unpaired_captions"] == ["2_cat/orphan.txt"] and pre["unsupported_files"] == ["2_cat/notes.pdf"]
    assert sum(b["image_steps"] for b in pre["buckets"]) == 10 and len(pre["buckets"]) == 2
    assert pre["batches_per_epoch"] == sum(b["batches"] for b in pre["buckets"]) == 5  # 8/2 + ceil(2/2)
    assert pre["steps_per_epoch"] == 5 and pre["total_steps"] == 15 and pre["epochs"] == 3
    assert pre["smaller_than_resolution"] == 6
    warned = {w["path"] for w in result["warnings"]}
    assert "dataset.resolution" in warned
    assert any("orphan.txt" in w["message"] for w in result["warnings"])
    # the guides' size figures: 6 images, 10 image-steps per epoch, 30 in all are below every range
    guidance = [w["message"] for w in result["warnings"] if "guides suggest" in w["message"]]
    assert len(guidance) == 3 and "6 training images: fewer" in guidance[0] and "30 image-steps in total" in guidance[2]
    assert api.get("/v1/jobs", headers=auth()).json()["items"] == []  # validate launches nothing


def test_zip_datasets_are_inspected_through_ranged_reads(api, s3, bucket):
    put(s3, bucket, "datasets/cats.zip", zip_dataset("5_cat", "a cat"))
    r = api.post("/v1/jobs:validate", json={"spec": spec(bucket, **{"dataset.uri": f"s3://{bucket}/datasets/cats.zip"})},
                 headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["preflight"]["image_steps_per_epoch"] == 15


def test_unauthenticated_requests_are_401(api, bucket):
    for method, url in [("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", "/v1/jobs/j-20250101t000000-00000000"),
                        ("post", "/v1/uploads")]:
        body = problem(getattr(api, method)(url), 401)
        assert "Bearer" in body["detail"]
    r = api.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_limits_are_429_naming_the_limit(client_factory, bucket):
    api = client_factory(launcher="none", reconcile_interval_s=0)
    body = problem(api.post("/v1/jobs", json={"spec": spec(bucket, **{"resources.gpus": 2, "resources.nodes": 2})},
                            headers=auth()), 429)
    assert body["limit"] == "max_gpus_per_job"
    body = problem(api.post("/v1/jobs", json={"spec": spec(bucket, **{"resources.max_runtime_s": 7200})},
                            headers=auth()), 429)
    assert body["limit"] == "max_runtime_s"
    for _ in range(3):  # max_concurrent_jobs = 3; nothing runs them here, so they stay queued
        assert api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth()).status_code == 201
    body = problem(api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth()), 429)
    assert body["limit"] == "max_concurrent_jobs"
    assert api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth("other")).status_code == 201


def test_the_tenant_max_runtime_is_filled_into_the_stored_spec(api, s3, bucket):
    job = api.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth()).json()
    key = job["spec_uri"].split(f"s3://{bucket}/", 1)[1]
    stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert b'"max_runtime_s": 3600' in stored


def test_importing_the_app_does_not_import_torch():
    code = "import sys, service.api.app, service.cli, service.launchers.local; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_files_a_tool_will_not_load_are_warned_at_validate_and_submit(api, bucket):
    """The loader-support table's gaps reach the client: an IA3 job names ComfyUI (no IA3 loader) and diffusers."""
    doc = spec(bucket, **{"network.algo": "ia3"})
    r = api.post("/v1/jobs:validate", json={"spec": doc}, headers=auth())
    assert r.status_code == 200, r.text
    gaps = [w["message"] for w in r.json()["warnings"] if w["path"] == "network.algo"]
    assert len(gaps) == 1 and "ComfyUI" in gaps[0] and "diffusers" in gaps[0] and "loads in A1111/Forge" in gaps[0]
    job = api.post("/v1/jobs", json={"spec": doc}, headers=auth())
    assert job.status_code == 201, job.text
    assert any(w.startswith("network.algo: ") and "ComfyUI" in w for w in job.json()["warnings"])
    plain = api.post("/v1/jobs:validate", json={"spec": spec(bucket)}, headers=auth()).json()
    assert not [w for w in plain["warnings"] if w["path"] == "network.algo"]
