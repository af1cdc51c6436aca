"""End to end with the REAL trainer: tiny model and dataset from `python -m trainer tiny-model /
tiny-dataset`, submitted through the API, run by the LocalLauncher as `python -m trainer run`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import REPO, auth, wait_finished

pytestmark = pytest.mark.slow


def make_assets(tmp: Path) -> tuple[Path, Path]:
    model, data = tmp / "tiny-sd1", tmp / "tiny-data"
    for argv in (["tiny-model", "--arch", "sd1", str(model)], ["tiny-dataset", str(data), "--images", "6"]):
        subprocess.run([sys.executable, "-m", "trainer", *argv], cwd=REPO, check=True, capture_output=True, timeout=300)
    return model, data


def test_submit_to_succeeded_with_the_real_trainer(client_factory, bucket, s3, tmp_path):
    model, data = make_assets(tmp_path)
    for local, prefix in ((model, "models/tiny-sd1"), (data, "datasets/real")):
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    client = client_factory(trainer_command=None, heartbeat_timeout_s=120, max_running_jobs=1)
    body = {"spec": {
        "version": 1, "name": "real-e2e",
        "model": {"uri": f"s3://{bucket}/models/tiny-sd1", "arch": "sd1"},
        "dataset": {"uri": f"s3://{bucket}/datasets/real", "resolution": 64, "caption_extension": ".txt"},
        "network": {"algo": "lora", "dim": 4, "alpha": 2},
        "optimizer": {"learning_rate": 1e-4},
        "training": {"max_train_steps": 4, "batch_size": 2, "seed": 0},
        "shrink": {"enabled": True, "rank": 2, "plot": False},
        "logging": {"log_with": "none"},
        "resources": {"gpus": 0, "max_attempts": 1},
    }}
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 201, r.text
    job = wait_finished(client, r.json()["id"], timeout_s=600)
    logs = client.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 80}, headers=auth()).text
    assert job["phase"] == "succeeded", (job, logs)
    assert job["progress"]["step"] == 4
    names = {o["name"] for o in job["outputs"]}
    assert {"real-e2e.safetensors", "real-e2e-shrunk.safetensors"} <= names or "last.safetensors" in names, names
