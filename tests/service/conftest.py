"""Fixtures of the service tests: the real app on the local S3 server (tests/conftest.py), two
tenants, a small dataset, and a LocalLauncher running the stand-in trainer (fake_trainer.py)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.common_helpers import app_clients, delete_bucket, s3_client, wait_for  # noqa: F401 (wait_for: re-exported)
from tests.common_helpers import image_bytes as png  # noqa: F401 (re-exported)
from tests.common_helpers import job_spec as spec  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
TOKENS = {"acme": "tok-acme-0123456789", "other": "tok-other-0123456789"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def put(client: Any, bucket: str, key: str, body: bytes) -> None:
    client.put_object(Bucket=bucket, Key=key, Body=body)


def zip_dataset(folder: str, caption: str, images: int = 3) -> bytes:
    """A .zip holding `images` 64x64 PNGs with `caption` as each one's .txt, all under `folder/`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(images):
            zf.writestr(f"{folder}/{i}.png", png(64, 64))
            zf.writestr(f"{folder}/{i}.txt", caption)
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3(s3_server: str) -> Any:
    return s3_client(s3_server)


def upload_tiny_dataset(s3: Any, bucket: str, prefix: str = "datasets/tiny") -> str:
    """4 captioned 64x64 images in 2_cat, 2 uncaptioned 96x64 in 1_dog; returns the dataset URI."""
    for i in range(4):
        put(s3, bucket, f"{prefix}/2_cat/{i}.png", png(64, 64))
        put(s3, bucket, f"{prefix}/2_cat/{i}.txt", b"a cat")
    for i in range(2):
        put(s3, bucket, f"{prefix}/1_dog/{i}.png", png(96, 64))
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def bucket(s3: Any) -> Iterator[str]:
    """One bucket per test module (creating buckets and apps is what costs time here), with
    models/tiny/ (a placeholder: the stand-in trainer reads no model) and datasets/tiny/. Tests that
    change a dataset use their own prefix (upload_tiny_dataset)."""
    name = f"svc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    put(s3, name, "models/tiny/model_index.json", b"{}")
    upload_tiny_dataset(s3, name)
    yield name
    delete_bucket(s3, name)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory, bucket: str) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tenants = [
        {"name": name, "token_sha256": [sha(tok)], "model_prefixes": [f"s3://{bucket}/models/"],
         "dataset_prefixes": [f"s3://{bucket}/datasets/"], "output_prefixes": [f"s3://{bucket}/results/{name}/"],
         "limits": {"max_concurrent_jobs": 3, "max_gpus_per_job": 2, "max_runtime_s": 3600}}
        for name, tok in TOKENS.items()
    ]
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[tenant]}"}


@pytest.fixture
def settings_factory(tmp_path: Path, bucket: str, tokens_file: Path) -> Callable[..., Any]:
    """Each test gets its own state root (tests do not see each other's jobs) in the module's bucket."""
    from service.settings import Settings

    state = f"s3://{bucket}/state-{uuid.uuid4().hex[:8]}/"

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "state_uri": state,
            "tokens_file": str(tokens_file),
            "launcher": "local",
            "local_dir": str(tmp_path / "local"),
            "trainer_cache_dir": str(tmp_path / "cache"),
            "trainer_command": [sys.executable, str(FAKE_TRAINER)],
            "reconcile_interval_s": 0.2,
            "max_running_jobs": 2,
            "heartbeat_timeout_s": 5.0,
            "cancel_grace_s": 5.0,
            "retry_backoff_s": 0.1,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def local_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in trainer imports `trainer.*`: put the repository on its PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("FAKE_STEP_S", "0.05")


@pytest.fixture
def client_factory(settings_factory: Callable[..., Any], local_launcher_env: None) -> Iterator[Callable[..., Any]]:
    """Builds the real app (LocalLauncher + reconciler) behind litestar's TestClient; all are closed
    and their trainers killed at the end."""
    yield from app_clients(settings_factory)


def wait_phase(client: Any, job_id: str, phases: set[str] | str, tenant: str = "acme", timeout_s: float = 30.0) -> dict:
    wanted = {phases} if isinstance(phases, str) else phases

    def check() -> dict | None:
        body = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant)).json()
        return body if body.get("phase") in wanted else None

    return wait_for(check, timeout_s, what=f"job {job_id} in {wanted}")


class LiveServer:
    """The app served by uvicorn on 127.0.0.1 in a thread (for real concurrency, CLI and schemathesis)."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        from service.dev.stack import free_port

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20, 0.02, "uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        launcher = self.app.state.services.extra.get("launcher")
        if launcher is not None and hasattr(launcher, "shutdown"):
            launcher.shutdown(kill=True, timeout_s=5)


@pytest.fixture
def live_server_factory(settings_factory: Callable[..., Any], local_launcher_env: None) -> Iterator[Callable[..., LiveServer]]:
    from service.api.app import create_app

    servers: list[LiveServer] = []

    def make(use_launcher: bool = True, **overrides: Any) -> LiveServer:
        app = create_app(settings_factory(**overrides), use_settings_launcher=use_launcher, events_poll_s=0.1)
        server = LiveServer(app)
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()


def wait_finished(client: Any, job_id: str, tenant: str = "acme", timeout_s: float = 30.0) -> dict:
    """Until the job is finished (finished_at, shown from the trainer's report on) and, where the test
    holds the app, the reconciler has written that to job.json (metrics, webhooks and the freed slot
    follow the write)."""
    services = getattr(getattr(getattr(client, "app", None), "state", None), "services", None)

    def check() -> dict | None:
        body = client.get(f"/v1/jobs/{job_id}", headers=auth(tenant)).json()
        if not body.get("finished_at"):
            return None
        if services is not None and services.store.read_record(tenant, job_id).final_phase is None:
            return None
        return body

    return wait_for(check, timeout_s, what=f"job {job_id} to be finished")


class RunningLauncher:
    """A launcher for reconciler tests driven by hand: records each launch as (job_id, attempt) and
    reports every attempt as still running (its trainer has not exited yet)."""

    def __init__(self) -> None:
        self.launched: list[tuple[str, int]] = []

    def submit(self, request: Any) -> None:
        self.launched.append((request.job_id, request.attempt))

    def state(self, tenant: str, job_id: str, attempt: int) -> Any:
        from service.launchers.base import AttemptState, RunState

        return AttemptState(state=RunState.RUNNING)

    def cancel(self, tenant: str, job_id: str, attempt: int) -> None:
        pass

    def logs(self, tenant: str, job_id: str, attempt: int, tail_lines: int = 200) -> str:
        return ""
