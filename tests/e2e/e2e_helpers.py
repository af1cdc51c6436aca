"""The container end-to-end stack: S3 (moto) on 127.0.0.1, the Kubernetes API stand-in with its Job
controller and kubelet running pods as Docker containers, and the service image running `lathe serve`
with the kubernetes launcher.

Everything is on host networking and 127.0.0.1. The service container gets its settings the way the
Helm chart gives them (LATHE_* and LATHE_K8S_* variables, a tokens file, a kubeconfig for the API);
each trainer pod gets whatever its Job says, the S3 credentials through the Secret it references.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from container_kubelet import Cluster, docker, docker_bin, wait_until

REPO = Path(__file__).resolve().parents[2]
SERVICE_IMAGE = os.environ.get("LATHE_E2E_SERVICE_IMAGE", "lathe-service:local")
TRAINER_IMAGE = os.environ.get("LATHE_E2E_TRAINER_IMAGE", "lathe-trainer:local-cpu")
NAMESPACE = "lathe"
TENANT = "e2e"
SECRET = "lathe-s3"
LABEL_KEY = "lathe-e2e"  # every container of a run carries it (make e2e removes leftovers by it)
# What the pod securityContext and the chart give the API container; the CLI runs the same way.
LOCKED_DOWN = ["--network", "host", "--read-only", "--user", "1000:1000", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,uid=1000,gid=1000,mode=0700"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_images() -> None:
    missing = [i for i in (SERVICE_IMAGE, TRAINER_IMAGE) if docker("image", "inspect", i, check=False).returncode != 0]
    if missing:
        raise RuntimeError(f"images {', '.join(missing)} are not in the Docker engine: run `make images` first")


def seed_assets(work: Path, s3: Any, bucket: str) -> None:
    """A tiny SD1.5 pipeline and dataset, made by the trainer's own CLI and uploaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model, data = work / "tiny-sd1", work / "tiny-data"
    for argv in (["tiny-model", "--arch", "sd1", str(model)], ["tiny-dataset", str(data), "--images", "8"]):
        proc = subprocess.run([sys.executable, "-m", "trainer", *argv], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    for local, prefix in ((model, "models/tiny-sd1"), (data, "datasets/tiny")):
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def make_spec(bucket: str, name: str, steps: int, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "version": 1,
        "name": name,
        "model": {"uri": f"s3://{bucket}/models/tiny-sd1", "arch": "sd1"},
        "dataset": {"uri": f"s3://{bucket}/datasets/tiny", "resolution": 64, "caption_extension": ".txt"},
        "network": {"algo": "locon", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1},
        "optimizer": {"type": "AdamW", "learning_rate": 1e-4},
        "training": {"max_train_steps": steps, "batch_size": 2, "seed": 0},
        "save": {"output_name": name, "checkpoint_every_n_steps": max(1, steps // 2)},
        "shrink": {"enabled": True, "rank": 2, "plot": False},
        "logging": {"log_with": "none"},
        "resources": {"gpus": 0, "max_attempts": 1},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


@dataclass
class Stack:
    work: Path
    s3_endpoint: str
    bucket: str
    token: str
    api: Any
    cluster: Cluster
    run_id: str
    url: str = ""
    service_name: str = ""
    service_log: Path | None = None
    _service: subprocess.Popen[bytes] | None = None

    # -- the service container ------------------------------------------------------------------
    def start_service(self, extra_env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        conf = self.work / "etc"
        conf.mkdir(mode=0o755, exist_ok=True)
        conf.chmod(0o755)  # read by UID 1000 in the container
        (conf / "kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": self.api.url}}],
            "users": [{"name": "lathe", "user": {"token": "e2e-not-checked"}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "lathe", "namespace": NAMESPACE}}],
        }))
        from service.tenants import hash_token

        (conf / "tokens.json").write_text(json.dumps({"tenants": [{
            "name": TENANT, "token_sha256": [hash_token(self.token)],
            "model_prefixes": [f"s3://{self.bucket}/models/"], "dataset_prefixes": [f"s3://{self.bucket}/datasets/"],
            "output_prefixes": [f"s3://{self.bucket}/results/"],
            "limits": {"max_concurrent_jobs": 8, "max_gpus_per_job": 8, "max_runtime_s": 86400},
        }]}))
        for path in conf.iterdir():
            path.chmod(0o644)
        env = {
            "LATHE_STATE_URI": f"s3://{self.bucket}/state/", "LATHE_TOKENS_FILE": "/etc/lathe/tokens.json",
            "LATHE_LAUNCHER": "kubernetes", "LATHE_RECONCILE_INTERVAL_S": "1", "LATHE_RETRY_BACKOFF_S": "0",
            "LATHE_MAX_RUNNING_JOBS": "0", "KUBECONFIG": "/etc/lathe/kubeconfig",
            "AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "LATHE_K8S_NAMESPACE": NAMESPACE, "LATHE_K8S_TRAINER_IMAGE": TRAINER_IMAGE,
            "LATHE_K8S_IMAGE_PULL_POLICY": "Never", "LATHE_K8S_S3_SECRET_NAME": SECRET,
            "LATHE_K8S_S3_ENDPOINT": self.s3_endpoint, "LATHE_K8S_RENDEZVOUS_PORT": str(free_port()),
            "LATHE_K8S_TERMINATION_GRACE_S": "30", "LATHE_K8S_OMP_NUM_THREADS": "1",
            "LATHE_K8S_DEFAULT_CPU": "1", "LATHE_K8S_DEFAULT_MEMORY": "4Gi", "LATHE_K8S_SCRATCH_SIZE": "4Gi",
            **(extra_env or {}),
        }
        env_file = self.work / "service.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.service_name = f"{self.run_id}-service"
        self.service_log = self.work / "service.log"
        argv = [docker_bin(), "run", "--rm", "--name", self.service_name, "--label", f"{LABEL_KEY}={self.run_id}",
                *LOCKED_DOWN, "--env-file", str(env_file), "-v", f"{conf}:/etc/lathe:ro",
                SERVICE_IMAGE, "serve", "--host", "127.0.0.1", "--port", str(port)]
        started = time.monotonic()
        with open(self.service_log, "wb") as log:
            self._service = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def ready() -> bool:
            if self._service is not None and self._service.poll() is not None:
                raise AssertionError(f"the service container exited ({self._service.returncode}):\n{self.service_tail()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "the service container to answer /readyz")
        record_figure("service container start to /readyz (s)", round(time.monotonic() - started, 1))

    def service_tail(self, n: int = 60) -> str:
        if self.service_log is None or not self.service_log.exists():
            return ""
        return "\n".join(self.service_log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self._service is not None and self._service.poll() is None:
            docker("stop", "--time", "10", self.service_name, check=False, timeout=60)
            try:
                self._service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._service.kill()
        self.cluster.stop()
        leftovers = docker("ps", "-aq", "--filter", f"label={LABEL_KEY}={self.run_id}", check=False).stdout.split()
        if leftovers:
            docker("rm", "-f", *leftovers, check=False)

    # -- the client: the `lathe` CLI of the service image, and the API over HTTP ------------------
    def lathe(self, *args: str, mounts: tuple[tuple[Path, str, str], ...] = (), timeout: float = 120) -> str:
        argv = ["run", "--rm", "--label", f"{LABEL_KEY}={self.run_id}", *LOCKED_DOWN,
                "-e", f"LATHE_URL={self.url}", "-e", f"LATHE_TOKEN={self.token}"]
        for host, inside, mode in mounts:
            argv += ["-v", f"{host}:{inside}:{mode}"]
        proc = docker(*argv, SERVICE_IMAGE, *args, check=False, timeout=timeout)
        assert proc.returncode == 0, f"lathe {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
        return proc.stdout

    def submit(self, spec: dict[str, Any]) -> str:
        folder = self.work / f"spec-{uuid.uuid4().hex[:8]}"
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        (folder / "spec.json").write_text(json.dumps(spec))
        (folder / "spec.json").chmod(0o644)
        return self.lathe("submit", "/in/spec.json", mounts=((folder, "/in", "ro"),)).strip()

    def job(self, job_id: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        reply.raise_for_status()
        return reply.json()

    def wait_phase(self, job_id: str, phases: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            self.check_alive()
            seen.update(self.job(job_id))
            return dict(seen) if seen["phase"] in phases else None

        try:
            return wait_until(reached, timeout_s, f"job {job_id} to reach {'/'.join(phases)}", interval_s=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {json.dumps(seen)[:2000]}\n{self.diagnostics()}") from None

    def check_alive(self) -> None:
        if self._service is not None and self._service.poll() is not None:
            raise AssertionError(f"the service container exited ({self._service.returncode}):\n{self.service_tail()}")
        if self.cluster.errors:
            raise AssertionError(f"the stand-in cluster's loop failed: {self.cluster.errors[-3:]}")

    def explain(self, view: dict[str, Any]) -> str:
        """Why a job ended as it did: its phase and error, then the service's and every pod's log tail."""
        return f"job {view['id']} {view['phase']}: {view.get('error')}\n{self.diagnostics()}"

    def diagnostics(self) -> str:
        parts = [f"--- service log\n{self.service_tail(40)}"]
        for pod, run in list(self.cluster.runtime.runs.items())[-3:]:
            parts.append(f"--- pod {pod} (exit {run.proc.poll()}, log {run.log_path})\n{run.logs()[-3000:]}")
        return "\n".join(parts)

    # -- the object store -------------------------------------------------------------------------
    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")

    def job_prefix(self, job_id: str) -> str:
        return f"state/tenants/{TENANT}/jobs/{job_id}/"

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read_json(self, key: str) -> dict[str, Any]:
        return json.loads(self.s3().get_object(Bucket=self.bucket, Key=key)["Body"].read())


def record_figure(name: str, value: object) -> None:
    """Measured figures of the run (docs/deploy.md), collected in $LATHE_E2E_FIGURES when set."""
    target = os.environ.get("LATHE_E2E_FIGURES")
    if not target:
        return
    path = Path(target)
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = value
    path.write_text(json.dumps(figures, indent=2))


def seconds_until(log: str, pattern: str, since: float) -> float | None:
    """Seconds from `since` (epoch) to the first trainer log line matching `pattern` (its timestamp)."""
    import datetime as dt
    import re

    for line in log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
        if m and re.search(pattern, line):
            when = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
            return round(when + int(m[2]) / 1000 - since, 1)
    return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
