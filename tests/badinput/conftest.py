"""Fixtures of the bad-input corpus: one bucket on the local S3 server (tests/conftest.py) holding a
model placeholder, a good dataset, a tenant and an API-only app (no launcher: nothing here starts a
trainer except test_badinput_run.py, which builds its own), plus one job submitted before any bad
input, so every case can check that nothing stored was lost or changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.common_helpers import delete_bucket, s3_client, seeded_bucket, write_one_tenant_tokens
from tests.badinput.badinput_helpers import (
    TENANT, TOKEN, assert_kept, auth, five_xx, image, sha, snapshot, spec,
)


@pytest.fixture(scope="session")
def bi_s3(s3_server: str) -> Any:
    return s3_client(s3_server)


@pytest.fixture(scope="session")
def bi_bucket(bi_s3: Any) -> Iterator[str]:
    name = seeded_bucket(bi_s3, "bad", ["datasets/good/2_cat"], image())
    yield name
    delete_bucket(bi_s3, name)


@pytest.fixture(scope="session")
def bi_tokens_file(tmp_path_factory: pytest.TempPathFactory, bi_bucket: str) -> Path:
    return write_one_tenant_tokens(tmp_path_factory.mktemp("bi-tokens") / "tokens.json", TENANT, sha(TOKEN),
                                   bi_bucket, f"results/{TENANT}/", max_concurrent_jobs=5, max_gpus_per_job=2)


@pytest.fixture(scope="session")
def bi_state(bi_bucket: str) -> str:
    return f"s3://{bi_bucket}/state/"


@pytest.fixture(scope="session")
def bi_api(bi_state: str, bi_tokens_file: Path) -> Iterator[Any]:
    """The real app behind litestar's TestClient, API only (no launcher, no reconciler). At the end,
    the app's own metrics must show no 5xx answer to anything the corpus sent."""
    from litestar.testing import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(state_uri=bi_state, tokens_file=str(bi_tokens_file), launcher="none", reconcile_interval_s=0,
                        max_image_pixels=8192 * 8192)
    app = create_app(settings, use_settings_launcher=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
        assert five_xx(app) == [], five_xx(app)


@pytest.fixture(scope="session")
def bi_existing_job(bi_api: Any, bi_s3: Any, bi_bucket: str) -> Iterator[dict[str, Any]]:
    """A job accepted before any bad input. At the end of the session the job is as it was, and every
    object stored before the corpus ran (its records, the model, the good dataset) is still there,
    unchanged (objects the cases uploaded come on top)."""
    r = bi_api.post("/v1/jobs", json={"spec": spec(bi_bucket, name="keep-me")}, headers=auth())
    assert r.status_code == 201, r.text
    before = snapshot(bi_s3, bi_bucket)
    yield r.json()
    assert_kept(before, snapshot(bi_s3, bi_bucket))
    job = bi_api.get(f"/v1/jobs/{r.json()['id']}", headers=auth()).json()
    assert (job["phase"], job["name"], job["spec_hash"]) == ("queued", "keep-me", r.json()["spec_hash"]), job


@pytest.fixture
def bi_unchanged(bi_s3: Any, bi_bucket: str, bi_existing_job: dict[str, Any]) -> Iterator[None]:
    """Around one case: the state root (job records, slots, idempotency records, index) is exactly as
    before: a rejected request wrote, moved and deleted nothing."""
    before = snapshot(bi_s3, bi_bucket, "state/")
    yield
    assert snapshot(bi_s3, bi_bucket, "state/") == before
