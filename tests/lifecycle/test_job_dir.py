"""`JobDir`: the job directory worked out once from the spec URI, as `python -m trainer run` takes it."""

from __future__ import annotations

import json

import pytest

from trainer.core.failures import JobFailure, Reason
from trainer.core.jobdir import JobDir


def test_a_local_spec_names_its_folder_and_inputs_relative_to_it(tmp_path):
    job = tmp_path / "jobs" / "j1"
    job.mkdir(parents=True)
    (job / "spec.toml").write_text('version = 1\nname = "x"\n[model]\nuri = "base"\n[dataset]\nuri = "data"\n')
    jobdir = JobDir.from_spec_uri(str(job / "spec.toml"))
    assert jobdir.uri == str(job) and jobdir.location.key == str(job)
    assert jobdir.store.uri("status.json") == str(job / "status.json")
    assert jobdir.output_store().root_uri == str(job / "output")
    assert jobdir.resolve_input("data") == str(job / "data")
    assert jobdir.resolve_input("../common/base") == str(tmp_path / "jobs" / "common" / "base")
    assert jobdir.resolve_input("/abs/model") == "/abs/model"
    assert jobdir.resolve_input("s3://b/model") == "s3://b/model"
    assert jobdir.read_spec().name == "x"  # .toml read as TOML


def test_a_file_uri_spec_leaves_relative_inputs_alone(tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    jobdir = JobDir.from_spec_uri(f"file://{tmp_path}/spec.json")
    assert jobdir.uri == str(tmp_path)
    assert jobdir.resolve_input("data") == "data"


def test_an_s3_spec_names_its_prefix(s3_bucket):
    jobdir = JobDir.from_spec_uri(f"s3://{s3_bucket}/tenants/acme/jobs/j1/spec.json")
    assert jobdir.uri == f"s3://{s3_bucket}/tenants/acme/jobs/j1/"
    assert (jobdir.location.bucket, jobdir.location.key) == (s3_bucket, "tenants/acme/jobs/j1")
    assert jobdir.spec_key == "spec.json"
    assert jobdir.resolve_input("data") == "data"
    with pytest.raises(JobFailure) as missing:
        jobdir.read_spec()
    assert missing.value.reason == Reason.SPEC_INVALID and "spec.json" in missing.value.message
    jobdir.store.put_bytes("spec.json", json.dumps({"version": 1, "model": {"uri": "s3://b/m"}}).encode())
    with pytest.raises(JobFailure) as invalid:
        jobdir.read_spec()
    assert invalid.value.reason == Reason.SPEC_INVALID and invalid.value.message.startswith(jobdir.spec_uri)
    assert JobDir.from_spec_uri(f"s3://{s3_bucket}/spec.json").uri == f"s3://{s3_bucket}/"


def test_a_refused_uri_names_itself():
    with pytest.raises(ValueError, match="%2e"):
        JobDir.from_spec_uri("s3://bucket/jobs/%2e%2e/spec.json")
