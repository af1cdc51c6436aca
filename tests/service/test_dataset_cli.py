"""`lathe dataset report` against a live server; `lathe tags --local` against the local S3 server and
`lathe tags` as a caption job run by the real trainer: the tag operations write a new dataset version
and leave the source as it was."""

from __future__ import annotations

import json
import uuid

from tests.service.test_cli import lathe
from tests.service.test_dataset_report import make_dataset


def keys(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_lathe_dataset_report_prints_concepts_tags_and_warnings(live_server_factory, s3, bucket):
    server = live_server_factory(use_launcher=False)
    uri = make_dataset(s3, bucket)
    out = lathe(server, "dataset", "report", uri, "--caption-extension", ".txt", "--resolution", "64").stdout
    assert "8 images" in out and "10_hero" in out and "hero (6)" in out
    assert "near-duplicate images" in out and "10_hero/0.png, 3_extra/copy.jpg" in out
    as_json = json.loads(lathe(server, "dataset", "report", uri, "--json", "--no-duplicates").stdout)
    assert as_json["duplicates"] is None and as_json["orphan_captions"] == []  # .caption: no caption files
    bad = lathe(server, "dataset", "report", "s3://elsewhere/x", check=False)
    assert bad.returncode == 1 and "outside the dataset locations" in bad.stderr


def test_lathe_tags_writes_a_new_version_and_leaves_the_source(live_server_factory, s3, bucket):
    server = live_server_factory(use_launcher=False)
    uri = make_dataset(s3, bucket)
    src_prefix = uri.split(f"s3://{bucket}/")[1]
    before = keys(s3, bucket, src_prefix)
    dest_prefix = f"datasets/v2-{uuid.uuid4().hex[:8]}"
    dest = f"s3://{bucket}/{dest_prefix}"
    proc = lathe(server, "tags", "--local", uri, dest, "--caption-extension", ".txt", "--remove", "sword",
                 "--replace", "red_hair=red hair", "--trigger", "hrx", "--remove-orphans")
    assert proc.stdout.strip() == dest
    after = keys(s3, bucket, dest_prefix)
    assert keys(s3, bucket, src_prefix) == before  # the source is untouched
    assert after["10_hero/1.txt"] == b"hrx, hero, red hair"
    assert after["10_hero/0.txt"] == b"hrx, hero, smile"
    assert "3_extra/gone.txt" not in after and "10_hero/2.txt" not in after
    assert after["10_hero/0.png"] == before["10_hero/0.png"]
    assert set(after) == set(before) - {"3_extra/gone.txt"}
    # the new version is never overwritten, nor is the source a destination
    again = lathe(server, "tags", "--local", uri, dest, "--caption-extension", ".txt", "--dedupe", check=False)
    assert again.returncode == 1 and "is not empty" in again.stderr
    inside = lathe(server, "tags", "--local", uri, uri + "/v2", "--dedupe", check=False)
    assert inside.returncode == 1 and "overlaps the source" in inside.stderr


def test_lathe_tags_submits_a_caption_job_with_no_model(live_server_factory, s3, bucket):
    import httpx

    from tests.common_helpers import wait_for
    from tests.service.conftest import TOKENS

    server = live_server_factory(trainer_command=None, heartbeat_timeout_s=120)
    uri = make_dataset(s3, bucket)
    src_prefix = uri.split(f"s3://{bucket}/")[1]
    before = keys(s3, bucket, src_prefix)
    dest_prefix = f"results/acme/v2-{uuid.uuid4().hex[:8]}"  # the tenant's output location
    job_id = lathe(server, "tags", uri, f"s3://{bucket}/{dest_prefix}", "--caption-extension", ".txt",
                   "--remove", "sword", "--trigger", "hrx", "--remove-orphans", "--name", "retag").stdout.strip()
    headers = {"Authorization": f"Bearer {TOKENS['acme']}"}

    def finished():
        body = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json()
        return body if body.get("finished_at") else None

    job = wait_for(finished, 300, 0.5, f"job {job_id}")
    assert job["phase"] == "succeeded" and job["kind"] == "caption", job
    after = keys(s3, bucket, dest_prefix)
    assert keys(s3, bucket, src_prefix) == before  # the source is untouched
    assert after["10_hero/0.txt"] == b"hrx, hero, smile"
    assert "3_extra/gone.txt" not in after and after["10_hero/0.png"] == before["10_hero/0.png"]
    no_op = lathe(server, "tags", uri, check=False)  # no operation: refused at submit, nothing runs
    assert no_op.returncode == 1 and "caption" in no_op.stderr
