"""A `kind = "grid"` job over two finished training jobs' saves, named by job id, through the API with the
REAL trainer run by the LocalLauncher: the service expands each job into its saves at submit, the grid
job renders them × weights, and grid.json and the grid PNG say what each cell is."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tests.lifecycle.lifecycle_helpers import build_tiny_assets, upload_dir
from tests.service.conftest import auth, wait_finished

pytestmark = pytest.mark.slow
PROMPT = "a circle --w 64 --h 64 --s 2 --d 3"


def _train_spec(bucket: str, name: str, seed: int) -> dict:
    return {"version": 1, "name": name,
            "model": {"uri": f"s3://{bucket}/models/tiny-sd1", "arch": "sd1"},
            "dataset": {"uri": f"s3://{bucket}/datasets/grid-api", "resolution": 64, "caption_extension": ".txt"},
            "network": {"algo": "lora", "dim": 4, "alpha": 4},
            "optimizer": {"learning_rate": 1e-2},
            "training": {"max_train_epochs": 2, "batch_size": 6, "seed": seed},
            "save": {"output_name": name, "save_every_n_epochs": 1},
            "shrink": {"enabled": False}, "logging": {"log_with": "none"},
            "resources": {"gpus": 0, "max_attempts": 1}}


def _finished(client, job_id: str) -> dict:
    job = wait_finished(client, job_id, timeout_s=600)
    logs = client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}, headers=auth()).text
    assert job["phase"] == "succeeded", (job, logs)
    return job


def test_grid_job_over_two_finished_jobs(client_factory, bucket, s3, tmp_path_factory, tiny_pipeline):
    assets = build_tiny_assets(tmp_path_factory, tiny_pipeline)
    upload_dir(s3, bucket, assets["model"], "models/tiny-sd1")
    upload_dir(s3, bucket, assets["data"], "datasets/grid-api")
    client = client_factory(trainer_command=None, heartbeat_timeout_s=300, max_running_jobs=2)
    ids = []
    for name, seed in (("first", 1), ("second", 2)):
        r = client.post("/v1/jobs", json={"spec": _train_spec(bucket, name, seed)}, headers=auth())
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for job_id, name in zip(ids, ("first", "second")):
        names = {o["name"] for o in _finished(client, job_id)["outputs"]}
        assert {f"{name}-000001.safetensors", f"{name}.safetensors"} <= names, names

    grid = {"version": 1, "kind": "grid", "name": "compare",
            "model": {"uri": f"s3://{bucket}/models/tiny-sd1", "arch": "sd1"},
            "grid": {"adapters": [{"job": ids[0], "label": "A"}, {"job": ids[1], "label": "B"}],
                     "prompts": [PROMPT], "x": "weight", "y": "saves", "weights": [0.5, 1.5]},
            "save": {"output_name": "compare"}, "resources": {"gpus": 0, "max_attempts": 1}}
    r = client.post("/v1/jobs", json={"spec": grid}, headers=auth())
    assert r.status_code == 201, r.text
    job = _finished(client, r.json()["id"])
    outputs = {o["name"]: o for o in job["outputs"]}

    def read(name: str) -> bytes:
        _, _, key = outputs[name]["uri"].removeprefix("s3://").partition("/")
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    record = json.loads(read("grid/grid.json"))
    rows = ["A/first-000001", "A/first", "B/second-000001", "B/second"]
    assert record["y"] == {"axis": "saves", "labels": rows}
    assert record["x"] == {"axis": "weight", "labels": ["0.5", "1.5"]}
    cells = record["prompts"][0]["cells"]
    assert {(c["row"], c["column"]) for c in cells} == {(r, c) for r in range(4) for c in range(2)}
    assert all(f"grid/{c['file']}" in outputs for c in cells)
    png = Image.open(io.BytesIO(read(f"grid/{record['prompts'][0]['grid']}")))
    assert png.width >= 2 * 64 and png.height >= 4 * 64
