"""Secrets stay secret: bearer tokens, the AWS secret key, the webhook secret and idempotency keys never
appear in anything stored (every object of the bucket: status.json, job.json, spec.json, logs, outputs,
metadata), in any log line (the service's, uvicorn's access log, botocore's at DEBUG, the trainers'),
in any HTTP answer or in webhook deliveries, after real runs: one job through the stand-in trainer to
success (outputs, presigned URLs, webhooks) and one through the REAL trainer to a dataset failure.
Presigned URLs are SigV4 and expire; the trainer's metadata and environment hold no service secret."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.security.security_helpers import (
    AWS_KEY_ID, AWS_SECRET, IDEMPOTENCY_KEY, TOKENS, WEBHOOK_SECRET, LiveServer, auth, bucket_blobs, find_secrets,
    presigned_url_accepted, sigv4_query_signature, spec, tree_blobs, wait_for,
)

WRONG_TOKEN = "tok-wrong-SECRET-77aa01"
SECRETS = {**{f"token:{t}": v for t, v in TOKENS.items()}, "token:wrong": WRONG_TOKEN, "aws-secret": AWS_SECRET,
           "webhook-secret": WEBHOOK_SECRET, "webhook-key": WEBHOOK_SECRET.removeprefix("whsec_"),
           "idempotency-key": IDEMPOTENCY_KEY}


@pytest.fixture(scope="module", autouse=True)
def secret_env() -> Iterator[None]:
    """Distinctive credentials for this module: the service and its trainers sign every S3 request
    with them (the S3 client is cached per access key id, so a fresh one is made)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        mp.setenv("LATHE_WEBHOOK_SECRET", WEBHOOK_SECRET)  # as a deployment sets it
        mp.setenv("LATHE_TOKEN", TOKENS["acme"])  # as a CLI user's shell would have it
        yield


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def attach(self) -> None:
        """(Again) on the root logger: litestar's logging setup replaces the root's handlers when an app
        is built, so call this after building one."""
        root = logging.getLogger()
        if self not in root.handlers:
            root.addHandler(self)


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    """Every log record of this process at DEBUG (botocore included: it logs request headers)."""
    handler = _Capture()
    root = logging.getLogger()
    old_level = root.level
    handler.attach()
    root.setLevel(logging.DEBUG)
    noisy = {name: logging.getLogger(name).level for name in ("botocore", "boto3", "urllib3", "s3transfer",
                                                               "uvicorn", "uvicorn.access", "uvicorn.error", "httpx")}
    # uvicorn's default logging config (applied by any earlier `lathe serve` in this process) stops
    # its loggers from propagating to the root: let them, or the scan misses the access log.
    propagate = {name: logging.getLogger(name).propagate for name in noisy}
    for name in noisy:
        logging.getLogger(name).setLevel(logging.DEBUG)
        logging.getLogger(name).propagate = True
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate[name]


class _Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every delivery (headers and body)."""

    def __init__(self) -> None:
        deliveries: list[bytes] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                deliveries.append(str(self.headers).encode() + b"\n" + body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.deliveries = deliveries
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def test_no_secret_is_stored_logged_or_answered(sec_settings, sec_s3, sec_bucket, tmp_path, captured_logs,
                                                 monkeypatch):
    from litestar.testing import TestClient

    from service.api.app import create_app
    from tests.badinput.badinput_helpers import good_members, image, tar_bytes
    from tests.security.security_helpers import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("FAKE_STEP_S", "0.02")
    receiver = _Receiver()
    answers: list[tuple[str, bytes]] = []

    def keep(resp: httpx.Response) -> httpx.Response:
        answers.append((f"{resp.request.method} {resp.request.url}",
                        str(resp.headers).encode() + b"\n" + resp.content))
        return resp

    # 1. The stand-in trainer to success, through a real HTTP server.
    server = LiveServer(create_app(sec_settings(webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True,
                                                webhook_phase_changes=True, local_dir=str(tmp_path / "local-a")),
                                   events_poll_s=0.1))
    captured_logs.attach()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            acme = {**auth("acme"), "Idempotency-Key": IDEMPOTENCY_KEY}
            body = {"spec": spec(sec_bucket, name="succeed"), "webhook_url": receiver.url}
            job_id = keep(http.post("/v1/jobs", json=body, headers=acme)).json()["id"]
            keep(http.post("/v1/jobs", json=body, headers=acme))  # the idempotent replay
            wait_for(lambda: keep(http.get(f"/v1/jobs/{job_id}", headers=auth())).json().get("finished_at"), 60,
                     what="the job to finish")
            keep(http.get(f"/v1/jobs/{job_id}/events", headers=auth()))
            keep(http.get(f"/v1/jobs/{job_id}/logs", headers=auth()))
            keep(http.get("/v1/jobs", headers=auth()))
            keep(http.post("/v1/uploads", json={"dataset": "d", "files": [{"path": "1_a/x.png"}]}, headers=auth()))
            keep(http.get(f"/v1/jobs/{job_id}", headers=auth("other")))
            keep(http.get("/v1/jobs", headers={"Authorization": f"Bearer {WRONG_TOKEN}"}))
            keep(http.post("/v1/jobs", json={"spec": {"version": 1}}, headers=acme))
            wait_for(lambda: len(receiver.deliveries) >= 2, 30, what="webhook deliveries")
            job = keep(http.get(f"/v1/jobs/{job_id}", headers=auth())).json()
            assert job["phase"] == "succeeded" and job["outputs"] and job["outputs"][0]["url"], job
            keep(http.get(job["outputs"][0]["url"]))  # the presigned GET works
    finally:
        server.stop()
        receiver.stop()

    # 2. The real trainer, failing on a hostile dataset (before torch is imported: seconds).
    key = "datasets/acme/evil.tar.gz"
    sec_s3.put_object(Bucket=sec_bucket, Key=key,
                      Body=tar_bytes([*good_members(), ("../escape.png", image())], mode="w:gz"))
    app = create_app(sec_settings(trainer_command=[sys.executable, "-m", "trainer", "run"],
                                  local_dir=str(tmp_path / "local-b")), events_poll_s=0.1)
    captured_logs.attach()
    with TestClient(app, raise_server_exceptions=False) as api:
        r = keep(api.post("/v1/jobs", json={"spec": spec(sec_bucket, **{"dataset.uri": f"s3://{sec_bucket}/{key}"})},
                          headers=auth()))
        real = wait_for(lambda: (j := keep(api.get(f"/v1/jobs/{r.json()['id']}", headers=auth())).json())
                        .get("finished_at") and j, 120, what="the real trainer's job to finish")
        keep(api.get(f"/v1/jobs/{real['id']}/logs", headers=auth()))
        app.state.services.extra["launcher"].shutdown(kill=True, timeout_s=5)
    assert real["error"]["reason"] == "dataset_invalid", real

    # 3. Scan everything.
    stored = bucket_blobs(sec_s3, sec_bucket)
    names = [where for where, _ in stored]
    for job_uri in (job["job_uri"], real["job_uri"]):
        assert f"{job_uri}status.json" in names and f"{job_uri}job.json" in names and f"{job_uri}spec.json" in names
    assert f"{real['job_uri']}logs/trainer.log" in names  # the real trainer uploaded its log
    local = tree_blobs(tmp_path)
    assert any(p.endswith("trainer.log") for p, _ in local)
    assert any("uvicorn.access" in line for line in captured_logs.lines)
    assert any("botocore" in line and "Authorization" in line for line in captured_logs.lines)  # headers logged
    logs = [("log", "\n".join(captured_logs.lines).encode())]
    hooks = [(f"webhook {i}", d) for i, d in enumerate(receiver.deliveries)]
    everything = stored + local + logs + answers + hooks
    assert find_secrets([("planted", f"x{AWS_SECRET}x".encode())], SECRETS)  # the scanner does find them
    assert find_secrets(everything, SECRETS) == []
    # The stored hash of a token is no stand-in for it either: tokens live only in the tokens file.
    from tests.security.security_helpers import sha

    assert find_secrets(stored, {t: sha(v) for t, v in TOKENS.items()}) == []


def test_presigned_urls_are_sigv4_and_expire(sec_client, sec_bucket, sec_s3):
    """S3 accepts a presigned URL until X-Amz-Date + X-Amz-Expires, both covered by the signature (the
    local S3 server checks neither, so the check is made here the way S3 makes it)."""
    api = sec_client(launcher="none", reconcile_interval_s=0, presign_expires_s=120)
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    body = {"dataset": "presign", "files": [{"path": "1_a/x.png", "content_type": "image/png"}, {"path": "1_a/x.txt"}]}
    grant = api.post("/v1/uploads", json=body, headers=auth()).json()
    assert abs(grant["expires_at"] - (time.time() + 120)) < 30
    services = api.app.state.services
    sec_s3.put_object(Bucket=sec_bucket, Key="results/acme/out.safetensors", Body=b"adapter")
    get_url = services.jobs._presign(f"s3://{sec_bucket}/results/acme/out.safetensors")
    urls = [("PUT", f["url"], f["headers"]) for f in grant["files"]] + [("GET", get_url, {})]
    for method, url, headers in urls:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-Expires"] == "120", url
        assert query["X-Amz-Credential"].startswith(AWS_KEY_ID + "/")
        assert sigv4_query_signature(url, AWS_SECRET, method, headers) == query["X-Amz-Signature"]
        signed = dt.datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        assert before - dt.timedelta(seconds=5) <= signed <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
        assert presigned_url_accepted(url, AWS_SECRET, method, signed + dt.timedelta(seconds=119), headers)
        assert not presigned_url_accepted(url, AWS_SECRET, method, signed + dt.timedelta(seconds=121), headers)
        longer = url.replace("X-Amz-Expires=120", "X-Amz-Expires=604800")  # a client stretching its URL
        assert not presigned_url_accepted(longer, AWS_SECRET, method, signed + dt.timedelta(seconds=60), headers)
        other_key = url.replace("/1_a/x", "/1_a/y").replace("out.safetensors", "other.safetensors")
        assert not presigned_url_accepted(other_key, AWS_SECRET, method, signed, headers)
    # The URLs work against the store while fresh.
    put = grant["files"][0]
    assert httpx.put(put["url"], content=b"\x89PNG", headers=put["headers"]).status_code == 200
    assert httpx.get(get_url).content == b"adapter"


@pytest.mark.parametrize("seconds", [59, 7 * 86400 + 1])
def test_presign_lifetimes_outside_1_minute_to_7_days_are_refused(seconds):
    from service.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="LATHE_PRESIGN_EXPIRES_S"):
        Settings.from_env({"LATHE_STATE_URI": "s3://x/", "LATHE_PRESIGN_EXPIRES_S": str(seconds)})


def test_trainer_metadata_holds_no_secret(tmp_path, monkeypatch):
    """The metadata.json the trainer publishes (trainer/job/train_outputs.py training_metadata) with every secret in its
    environment: spec, versions, platform and the adapter header only, nothing from the environment.
    (trainer.models.adapter_file imports torch; its header reader is stood in for by a plain JSON reader.)"""
    import types

    from trainer.job.train_job import Job

    header = {"ss_network_module": "lycoris.kohya", "ss_output_name": "x"}
    stub = types.ModuleType("trainer.models.adapter_file")
    stub.read_metadata = lambda path: dict(header)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trainer.models.adapter_file", stub)
    monkeypatch.setenv("LATHE_GIT_COMMIT", "0123abc")
    from trainer.core.settings import trainer_settings

    trainer_settings.cache_clear()
    from trainer.core.spec import spec_from_obj

    from trainer.core.jobdir import JobDir, StatusReporter
    from trainer.job.context import RunContext
    from trainer.job.train_outputs import training_metadata
    from trainer.core.storage import LocalStore

    jobdir = JobDir.from_spec_uri(str(tmp_path / "job" / "spec.json"))
    ctx = RunContext(jobdir=jobdir, out=LocalStore(tmp_path / "out"),
                     work_dir=tmp_path / "work", cache_dir=tmp_path / "cache", attempt=1)
    job = Job(ctx, spec_from_obj(spec("b")), StatusReporter(jobdir.store, attempt=1))
    job.reporter.warn("w")
    result = types.SimpleNamespace(final_path=str(tmp_path / "x.safetensors"), steps_done=3, epochs_done=1,
                                   avg_loss=0.1, loss_history=[0.2, 0.1])
    metadata = json.dumps(training_metadata(job, result, None)).encode()
    assert b"0123abc" in metadata and b"lycoris.kohya" in metadata
    assert find_secrets([("metadata.json", metadata)], SECRETS) == []
    assert AWS_KEY_ID.encode() not in metadata


def test_trainers_started_locally_do_not_inherit_service_secrets(tmp_path):
    """The LocalLauncher passes the object-store credentials on, and nothing only the service needs."""
    from service.launchers.base import LaunchRequest
    from service.launchers.local import LocalLauncher
    from trainer.core.spec import spec_from_obj

    dump = tmp_path / "env.json"
    command = [sys.executable, "-c", f"import json, os; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))"]
    launcher = LocalLauncher(tmp_path / "local", command, cache_dir=str(tmp_path / "cache"))
    launcher.submit(LaunchRequest(job_id="j-20250101t000000-00000000", tenant="acme", attempt=1,
                                  spec_uri="s3://b/spec.json", spec=spec_from_obj(spec("b")), env={}))
    env = wait_for(lambda: dump.exists() and dump.stat().st_size and json.loads(dump.read_text()), 30, what="the env dump")
    assert env["AWS_SECRET_ACCESS_KEY"] == AWS_SECRET  # what a trainer needs
    assert not {"LATHE_WEBHOOK_SECRET", "LATHE_TOKEN", "LATHE_TOKENS_FILE"} & set(env), sorted(env)
    launcher.shutdown(kill=True, timeout_s=5)
