"""Fixtures for whole-job tests: a tiny model and dataset uploaded once to the local S3 server.

The plain helpers live in lifecycle_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lifecycle.lifecycle_helpers import build_tiny_assets, s3_client, upload_dir


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, tiny_pipeline) -> dict[str, Path]:
    """A tiny SD1.5 pipeline (folder) and a tiny dataset, built once per session."""
    return build_tiny_assets(tmp_path_factory, tiny_pipeline)


@pytest.fixture()
def job_bucket(s3_server, s3_bucket, tiny_assets):
    """A bucket holding models/tiny-sd1/ and datasets/tiny/ on the shared local S3 server."""
    client = s3_client(s3_server)
    upload_dir(client, s3_bucket, tiny_assets["model"], "models/tiny-sd1")
    upload_dir(client, s3_bucket, tiny_assets["data"], "datasets/tiny")
    return s3_bucket
