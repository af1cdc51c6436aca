"""Submit → succeeded through the real app, the LocalLauncher and the stand-in trainer."""

from __future__ import annotations

import urllib.request

from tests.service.conftest import auth, spec, wait_phase


def test_submit_runs_to_succeeded_with_outputs_and_presigned_url(client_factory, bucket):
    client = client_factory()
    r = client.post("/v1/jobs", json={"spec": spec(bucket)}, headers=auth())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["phase"] == "queued" and job["id"].startswith("j-")
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    pre = job["preflight"]
    assert pre["images"] == 6 and pre["image_steps_per_epoch"] == 4 * 2 + 2 * 1
    assert {c["name"]: c["repeats"] for c in pre["concepts"]} == {"2_cat": 2, "1_dog": 1}

    done = wait_phase(client, job["id"], {"succeeded", "failed"})
    assert done["phase"] == "succeeded", done
    assert done["progress"]["step"] == 3 and done["attempt"] == 1
    (out,) = done["outputs"]
    assert out["name"] == "last.safetensors" and out["size"] > 0 and len(out["sha256"]) == 64
    with urllib.request.urlopen(out["url"]) as resp:  # the presigned GET works without credentials
        assert resp.read().startswith(b"fake adapter")
