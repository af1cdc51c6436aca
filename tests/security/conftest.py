"""Fixtures of the security tests: one bucket on the local S3 server (tests/conftest.py) with a model
placeholder and a small dataset per tenant, a tokens file with three tenants (one, `acme-evil`, whose
name extends another's), and a factory of real apps behind litestar's TestClient."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.common_helpers import app_clients, delete_bucket, s3_client, seeded_bucket
from tests.security.security_helpers import FAKE_TRAINER, REPO, TOKENS, png, tenants_doc


@pytest.fixture(scope="session")
def sec_s3(s3_server: str) -> Any:
    return s3_client(s3_server)


@pytest.fixture(scope="session")
def sec_bucket(sec_s3: Any) -> Iterator[str]:
    name = seeded_bucket(sec_s3, "sec", [f"datasets/{tenant}/tiny/2_cat" for tenant in TOKENS], png())
    yield name
    delete_bucket(sec_s3, name)


@pytest.fixture(scope="session")
def sec_tokens_file(tmp_path_factory: pytest.TempPathFactory, sec_bucket: str) -> Path:
    path = tmp_path_factory.mktemp("sec-tokens") / "tokens.json"
    path.write_text(json.dumps(tenants_doc(sec_bucket)))
    return path


@pytest.fixture
def sec_settings(tmp_path: Path, sec_bucket: str, sec_tokens_file: Path) -> Callable[..., Any]:
    """Settings with a state root of the test's own, the LocalLauncher running the service tests'
    stand-in trainer (fast), and a quick reconciler; keyword arguments override."""
    from service.settings import Settings

    state = f"s3://{sec_bucket}/state-{uuid.uuid4().hex[:8]}/"

    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = dict(
            state_uri=state, tokens_file=str(sec_tokens_file), launcher="local", local_dir=str(tmp_path / "local"),
            trainer_cache_dir=str(tmp_path / "cache"), trainer_command=[sys.executable, str(FAKE_TRAINER)],
            reconcile_interval_s=0.2, heartbeat_timeout_s=30.0, cancel_grace_s=5.0, retry_backoff_s=0.1,
            max_running_jobs=2)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def sec_client(sec_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Builds the real app (launcher per settings) behind TestClient; closed, trainers killed, at the end."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    yield from app_clients(sec_settings)
