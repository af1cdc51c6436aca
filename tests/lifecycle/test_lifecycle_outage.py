"""The object store goes away for a few seconds mid-run: the job still finishes.

Uses its own in-process moto server (state survives stop/start in one process) so that stopping it
does not disturb the shared server of other tests.
"""

from __future__ import annotations

import time

import pytest
from moto.server import ThreadedMotoServer

from tests.common_helpers import free_port
from tests.lifecycle.lifecycle_helpers import (
    finish, make_spec, put_spec, read_json, s3_client, start_trainer, trainer_env, upload_dir, wait_for,
)

pytestmark = pytest.mark.slow


def _moto_server(port: int) -> ThreadedMotoServer:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


def test_job_survives_s3_outage(tiny_assets, tmp_path):
    port = free_port()
    server = _moto_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket="outage")
    upload_dir(client, "outage", tiny_assets["model"], "models/tiny-sd1")
    upload_dir(client, "outage", tiny_assets["data"], "datasets/tiny")
    spec = make_spec("outage", **{"training.max_train_steps": 8})
    uri = put_spec(endpoint, "outage", "j-outage", spec)
    proc = start_trainer(uri, trainer_env(endpoint, tmp_path / "cache"), tmp_path / "w")
    try:
        wait_for(lambda: ((read_json(endpoint, "outage", "tenants/t1/jobs/j-outage/status.json") or {})
                          .get("progress") or {}).get("step", 0) >= 2, timeout_s=240, proc=proc)
        server.stop()  # checkpoints, heartbeats and later uploads hit a dead endpoint
        time.sleep(4)
        server = _moto_server(port)
        code, out = finish(proc)
        assert code == 0, out[-4000:]
        meta = read_json(endpoint, "outage", "tenants/t1/jobs/j-outage/output/metadata.json")
        assert meta is not None and meta["steps"] == 8
        status = read_json(endpoint, "outage", "tenants/t1/jobs/j-outage/status.json")
        assert status["phase"] == "succeeded"
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
