"""A caption job whose dataset is a .zip on S3 passes the submit checks (the preflight reads the
archive as for training); the trainer extracts it (tests/data/test_caption_archive.py)."""

from __future__ import annotations

from tests.service.conftest import auth, put, zip_dataset


def test_caption_job_on_a_zip_is_accepted_at_submit(client_factory, bucket, s3):
    put(s3, bucket, "datasets/zipped/bare.zip", zip_dataset("4_hero", "bad, smile"))
    client = client_factory(launcher="none", reconcile_interval_s=0)
    body = {"spec": {"version": 1, "kind": "caption", "dataset": {"uri": f"s3://{bucket}/datasets/zipped/bare.zip"},
                     "caption": {"remove": ["bad"], "caption_extension": ".txt"}, "resources": {"gpus": 0}}}
    r = client.post("/v1/jobs:validate", json=body, headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["preflight"]["images"] == 3
