"""Restart the service mid-job: `python -m service.cli serve` is stopped while the trainer runs and
started again; the job's status and result are intact (the object store is the only state)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from service.dev.stack import free_port
from tests.service.conftest import FAKE_TRAINER, REPO, TOKENS, spec, wait_for


def serve(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 60, 0.1, "lathe serve")
    return proc


def test_restart_mid_job_keeps_status_and_result(bucket, tokens_file, tmp_path, s3_server):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_STEP_S": "0.25", "LATHE_STATE_URI": f"s3://{bucket}/restart/",
           "LATHE_TOKENS_FILE": str(tokens_file), "LATHE_LOCAL_DIR": str(tmp_path / "local"),
           "LATHE_LOCAL_CACHE_DIR": str(tmp_path / "cache"), "LATHE_RECONCILE_INTERVAL_S": "0.2",
           "LATHE_TRAINER_COMMAND": f'["{sys.executable}", "{FAKE_TRAINER}"]', "AWS_ENDPOINT_URL": s3_server}
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKENS['acme']}"}
    first = serve(env, port)
    try:
        job = httpx.post(f"{url}/v1/jobs", json={"spec": spec(bucket, **{"training.max_train_steps": 16})},
                         headers=headers, timeout=60).json()
        job_id = job["id"]
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()["phase"] == "training", 60)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    before = time.time()
    second = serve(env, port)  # the trainer kept running meanwhile
    try:
        seen = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()
        assert seen["phase"] in ("training", "uploading", "succeeded") and seen["attempt"] == 1
        done = wait_for(lambda: (j := httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json())["finished_at"] and j,
                        60, 0.2, "the job to finish")
        assert done["phase"] == "succeeded" and done["attempt"] == 1, done  # the same attempt, not a retry
        assert done["progress"]["step"] == 16 and done["outputs"][0]["name"] == "last.safetensors"
        # job.json's end written by the second service (finished_at is the trainer's own report time)
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()["updated_at"] >= before, 30, 0.2,
                 "the second service to record the end")
        logs = httpx.get(f"{url}/v1/jobs/{job_id}/logs", headers=headers).text
        assert "step 16/16" in logs
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
