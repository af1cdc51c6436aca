"""The `lathe` CLI against a live server: submit prints the id alone, status --watch follows to the
end, logs, list, pull (sha256-checked) and upload through presigned URLs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.service.conftest import REPO, TOKENS, png, spec


def lathe(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "LATHE_URL": server.url, "LATHE_TOKEN": TOKENS["acme"]}
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_submit_watch_logs_list_pull_upload(live_server_factory, bucket, tmp_path):
    server = live_server_factory()
    toml = tmp_path / "spec.toml"
    doc = spec(bucket, **{"training.max_train_steps": 4})
    toml.write_text(
        "version = 1\n"
        f'[model]\nuri = "{doc["model"]["uri"]}"\n'
        f'[dataset]\nuri = "{doc["dataset"]["uri"]}"\nresolution = 64\ncaption_extension = ".txt"\n'
        "[training]\nmax_train_steps = 4\n[resources]\ngpus = 0\n")
    job_id = lathe(server, "submit", str(toml)).stdout.strip()
    assert job_id.startswith("j-") and "\n" not in job_id  # the id alone, for scripts

    watched = lathe(server, "status", job_id, "--watch")
    assert watched.stdout.strip().splitlines()[-1] == f"{job_id} succeeded"
    assert "4/4" in watched.stdout
    assert "step 4/4" in lathe(server, "logs", job_id).stdout
    listed = json.loads(lathe(server, "list", "--json").stdout)
    assert [i["id"] for i in listed["items"]] == [job_id]

    pulled = lathe(server, "pull", job_id, str(tmp_path / "out")).stdout.split()
    (path,) = pulled
    record = json.loads(lathe(server, "status", job_id, "--json").stdout)
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == record["outputs"][0]["sha256"]

    data = tmp_path / "mydata" / "3_cat"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(png(64, 64))
    (data / "a.txt").write_text("a cat")
    dataset_uri = lathe(server, "upload", str(tmp_path / "mydata"), "--name", "mydata").stdout.strip()
    assert dataset_uri.endswith("/tenants/acme/datasets/mydata/")
    (tmp_path / "up.json").write_text(json.dumps(spec(bucket, **{"dataset.uri": dataset_uri})))
    checked = lathe(server, "submit", str(tmp_path / "up.json"), "--validate", "--json").stdout
    assert json.loads(checked)["preflight"]["image_steps_per_epoch"] == 3

    bad = lathe(server, "submit", str(tmp_path / "up.json"), "--idempotency-key", "k", check=False)
    again = lathe(server, "submit", str(toml), "--idempotency-key", "k", check=False)
    assert bad.returncode == 0 and again.returncode == 1
    assert "409" in again.stderr and "Idempotency-Key" in again.stderr


def test_serve_with_a_missing_tokens_file_says_so_without_a_traceback(tmp_path):
    env = {**os.environ, "LATHE_STATE_URI": str(tmp_path / "state"), "LATHE_LAUNCHER": "none",
           "LATHE_TOKENS_FILE": str(tmp_path / "no-such-tokens.json")}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no-such-tokens.json" in proc.stderr and "Traceback" not in proc.stderr



@pytest.mark.parametrize("verbose", [False, True])
def test_dev_logs_no_s3_access_lines_unless_verbose(tmp_path, verbose):
    """The local S3 server of `lathe dev` answers ~20 requests a second while a job runs; one log line
    each would scroll the LATHE_URL/LATHE_TOKEN lines away. They are logged only with --verbose."""
    import logging

    import boto3

    from service.cli import build_parser
    from service.dev.stack import DevStack

    assert build_parser().parse_args(["dev", *(["--verbose"] if verbose else [])]).verbose is verbose
    access: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            access.append(record.getMessage())

    collect = Collect()
    logging.getLogger("werkzeug").addHandler(collect)  # the logger moto's server writes its access log to
    environ = dict(os.environ)  # DevStack points AWS_* at its own S3 server for this process
    stack = DevStack(tmp_path / "dev", api_port=0, seed=False, verbose=verbose)
    try:
        stack.start()
        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1")
        for _ in range(5):
            s3.list_objects_v2(Bucket="lathe")
    finally:
        stack.stop()
        logging.getLogger("werkzeug").removeHandler(collect)
        os.environ.clear()
        os.environ.update(environ)
    requests = [line for line in access if "HTTP/1.1" in line]
    assert (len(requests) >= 6) if verbose else (requests == []), access[:5]
