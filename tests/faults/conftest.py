"""Fixtures of the fault-injection tests: the tiny model and dataset on the session's S3 server, and
the service's tenants. The plain helpers (trainer runs with kill plans, the service as a process,
output checks) live in fault_helpers.py."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.common_helpers import write_one_tenant_tokens
from tests.faults.fault_helpers import TENANT, TOKEN, build_tiny_assets
from tests.lifecycle.lifecycle_helpers import s3_client, upload_dir


@pytest.fixture(scope="session")
def fault_assets(tmp_path_factory, tiny_pipeline) -> dict[str, Path]:
    """A tiny SD1.5 pipeline (folder) and a tiny dataset (shared with tests/lifecycle in one session)."""
    return build_tiny_assets(tmp_path_factory, tiny_pipeline)


@pytest.fixture()
def fault_bucket(s3_server, s3_bucket, fault_assets) -> str:
    """A bucket holding models/tiny-sd1/ and datasets/tiny/ on the session's S3 server."""
    client = s3_client(s3_server)
    upload_dir(client, s3_bucket, fault_assets["model"], "models/tiny-sd1")
    upload_dir(client, s3_bucket, fault_assets["data"], "datasets/tiny")
    return s3_bucket


@pytest.fixture()
def service_bucket(s3_server, s3_bucket, tmp_path) -> str:
    """A bucket for the service tests (stand-in trainer): a tiny dataset and a placeholder model."""
    from trainer.tools.tinydata import make_tiny_dataset

    client = s3_client(s3_server)
    make_tiny_dataset(str(tmp_path / "svc-data"), images=6, seed=0)
    upload_dir(client, s3_bucket, tmp_path / "svc-data", "datasets/tiny")
    client.put_object(Bucket=s3_bucket, Key="models/tiny-sd1/model_index.json", Body=b"{}")
    return s3_bucket


@pytest.fixture()
def tokens_file(tmp_path, s3_bucket) -> Path:
    """One tenant that may use the bucket, with room for every job the service tests submit."""
    from service.tenants import hash_token

    return write_one_tenant_tokens(tmp_path / f"tokens-{uuid.uuid4().hex[:6]}.json", TENANT, hash_token(TOKEN),
                                   s3_bucket, "results/", max_concurrent_jobs=64, max_gpus_per_job=1)
