"""`lathe dev`: the whole stack on 127.0.0.1 — a local S3 server (moto), the API with the
LocalLauncher, a dev tenant, and a tiny model + dataset seeded through `python -m trainer
tiny-model/tiny-dataset`. The demo (`make demo`) builds on DevStack.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from service.settings import Settings
from service.tenants import hash_token

log = logging.getLogger("lathe.dev")

DEV_BUCKET = "lathe"
DEV_TENANT = "dev"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevStack:
    def __init__(self, workdir: str | os.PathLike[str] = ".lathe/dev", *, api_port: int = 8000, s3_port: int = 0,
                 seed: bool = True, token: str | None = None, settings_overrides: dict[str, Any] | None = None,
                 verbose: bool = False) -> None:
        self.workdir = Path(workdir).resolve()
        self.api_port = api_port or free_port()
        self.s3_port = s3_port or free_port()
        self.seed_assets = seed
        self.token = token or "dev-" + secrets.token_urlsafe(18)
        self.settings_overrides = dict(settings_overrides or {})
        self.verbose = verbose  # the local S3 server's access log (one line per request)
        self.s3_endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.console_url = f"{self.url}/ui/"  # the web console: sign in there with the token (never in the URL)
        self.model_uri = f"s3://{DEV_BUCKET}/models/tiny-sd1"
        self.dataset_uri = f"s3://{DEV_BUCKET}/datasets/tiny"
        self._moto: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.app: Any = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> DevStack:
        from moto.server import ThreadedMotoServer

        self.workdir.mkdir(parents=True, exist_ok=True)
        # moto's server logs every request through werkzeug's logger: ~20 lines a second while a job runs,
        # which would bury everything else (the LATHE_URL/LATHE_TOKEN lines `lathe dev` prints first).
        logging.getLogger("werkzeug").setLevel(logging.INFO if self.verbose else logging.WARNING)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        self._moto.start()
        # The service, the trainers it starts and boto3 here all talk to the local server only.
        os.environ.update({
            "AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "dev", "AWS_SECRET_ACCESS_KEY": "dev",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        })
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self._s3().create_bucket(Bucket=DEV_BUCKET)
        tokens = self.workdir / "tokens.json"
        tokens.write_text(json.dumps({"tenants": [{
            "name": DEV_TENANT, "token_sha256": [hash_token(self.token)],
            "model_prefixes": [f"s3://{DEV_BUCKET}/models/"], "dataset_prefixes": [f"s3://{DEV_BUCKET}/datasets/"],
            "output_prefixes": [f"s3://{DEV_BUCKET}/results/"],
            "limits": {"max_concurrent_jobs": 8, "max_gpus_per_job": 8, "max_runtime_s": 86400},
        }]}, indent=2))
        if self.seed_assets:
            self.seed()
        self._start_api(tokens)
        return self

    def stop(self) -> None:
        launcher = self.app.state.services.extra.get("launcher") if self.app is not None else None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if launcher is not None and hasattr(launcher, "shutdown"):
            launcher.shutdown(kill=True)
        if self._moto is not None:
            self._moto.stop()

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- pieces ---------------------------------------------------------------------------------
    def _s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")

    def seed(self) -> None:
        """A tiny SD1.5 pipeline and a tiny dataset, written by the trainer's own CLI and uploaded."""
        model_dir, data_dir = self.workdir / "tiny-sd1", self.workdir / "tiny-data"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if not (model_dir / "model_index.json").exists():
            self._run([sys.executable, "-m", "trainer", "tiny-model", "--arch", "sd1", str(model_dir)], env)
        if not data_dir.exists():
            self._run([sys.executable, "-m", "trainer", "tiny-dataset", str(data_dir), "--images", "8"], env)
        s3 = self._s3()
        for local, prefix in ((model_dir, "models/tiny-sd1"), (data_dir, "datasets/tiny")):
            for path in sorted(local.rglob("*")):
                if path.is_file():
                    s3.upload_file(str(path), DEV_BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")

    @staticmethod
    def _run(argv: list[str], env: dict[str, str]) -> None:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[1:])} failed ({proc.returncode}); is the trainer installed "
                               f"(pip install -e '.[trainer]')?\n{proc.stderr[-2000:]}")

    def _start_api(self, tokens: Path) -> None:
        import uvicorn

        from service.api.app import create_app

        values: dict[str, Any] = {
            "state_uri": f"s3://{DEV_BUCKET}/state/", "tokens_file": str(tokens), "launcher": "local",
            "local_dir": str(self.workdir / "local"), "trainer_cache_dir": str(self.workdir / "cache"),
            "port": self.api_port, "reconcile_interval_s": 0.5, "webhook_allow_private": True,
        }
        values.update(self.settings_overrides)
        settings = Settings.from_env(os.environ, **values)
        self.app = create_app(settings, events_poll_s=0.5)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.api_port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="lathe-dev-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.05)

    def example_spec(self, **training: Any) -> dict[str, Any]:
        """A spec that trains the tiny model for a few steps on CPU."""
        return {
            "version": 1,
            "name": "tiny-demo",
            "model": {"uri": self.model_uri, "arch": "sd1"},
            "dataset": {"uri": self.dataset_uri, "resolution": 64, "caption_extension": ".txt"},
            "network": {"algo": "locon", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1},
            "optimizer": {"type": "AdamW", "learning_rate": 1e-4},
            "training": {"max_train_steps": 6, "batch_size": 2, "seed": 0, **training},
            "save": {"output_name": "tiny-demo", "checkpoint_every_n_steps": 3},
            "shrink": {"enabled": True, "rank": 2, "plot": False},
            "logging": {"log_with": "none"},
            "resources": {"gpus": 0, "max_attempts": 2},
        }
