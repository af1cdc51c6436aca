"""Plain helpers of the whole-job tests (no fixtures): trainer subprocesses, specs and the local S3 server.

A module of its own, not conftest: `from conftest import` breaks when pytest collects several folders,
and other suites (tests/faults) reuse these.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.common_helpers import apply_changes, s3_client, wait_for  # noqa: F401 (s3_client, wait_for: re-exported)

REPO = Path(__file__).resolve().parents[2]
_ASSETS: dict[str, Path] = {}


def build_tiny_assets(tmp_path_factory, tiny_pipeline) -> dict[str, Path]:
    """A tiny SD1.5 pipeline (folder, from the session's `tiny_pipeline` fixture) and a tiny dataset,
    built once per session (the test suites that need them share the one build)."""
    if not _ASSETS:
        from trainer.tools.tinydata import make_tiny_dataset

        root = tmp_path_factory.mktemp("assets")
        model = Path(tiny_pipeline("sd1"))
        make_tiny_dataset(str(root / "data"), images=6, seed=0)
        _ASSETS.update(model=model, data=root / "data")
    return dict(_ASSETS)


def trainer_env(endpoint: str, cache_dir: Path, attempt: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "LYCORIS_KERNEL_BACKEND": "torch", "LATHE_CACHE_DIR": str(cache_dir), "LATHE_JOB_ATTEMPT": str(attempt),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("AWS_ENDPOINT_URL_S3", None)  # it would win over AWS_ENDPOINT_URL and send S3 calls elsewhere
    return env


def upload_dir(client, bucket: str, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def make_spec(bucket: str, **overrides) -> dict:
    spec = {
        "version": 1,
        "model": {"uri": f"s3://{bucket}/models/tiny-sd1", "arch": "sd1"},
        "dataset": {"uri": f"s3://{bucket}/datasets/tiny", "resolution": 64, "caption_extension": ".txt",
                    "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 8},
        "network": {"algo": "lora", "dim": 4, "alpha": 4},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_train_steps": 6, "batch_size": 1, "seed": 1},
        "save": {"output_name": "tiny", "checkpoint_every_n_steps": 2, "save_every_n_steps": 3},
        "shrink": {"enabled": True},
        "logging": {"log_with": "tensorboard"},
    }
    return apply_changes(spec, overrides)


def put_spec(endpoint: str, bucket: str, job_id: str, spec: dict) -> str:
    key = f"tenants/t1/jobs/{job_id}/spec.json"
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=json.dumps(spec).encode())
    return f"s3://{bucket}/{key}"


def start_trainer(spec_uri: str, env: dict[str, str], work: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", "run", spec_uri, "--work-dir", str(work)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_json(endpoint: str, bucket: str, key: str) -> dict | None:
    try:
        return json.loads(s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception:  # noqa: BLE001 — not there (yet) or the server is briefly down
        return None


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
