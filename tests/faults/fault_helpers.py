"""Plain helpers of the fault-injection tests (no fixtures; a module of its own, not conftest, so that
test modules can import it whichever folders pytest collects).

- `fault_rng`: the seeded RNG every random choice comes from; the seed is printed (pytest shows it
  with a failure) and `LATHE_FAULT_SEED=<seed>` replays the same kill moments.
- `TrainerRun`: `python -m trainer run` in its own process group, its output read line by line with
  timestamps, milestones (phases from the trainer's log) to anchor kills and outages on.
- `ServiceProcess`: `python -m service.cli serve` as deployed, to SIGKILL mid-request.
- `check_outputs`: what a finished job must have published (sha256 of every output, exact steps, the
  adapter loads in diffusers).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.common_helpers import job_spec
from tests.lifecycle.lifecycle_helpers import REPO, build_tiny_assets, read_json, s3_client, trainer_env  # noqa: F401

TENANT = "acme"
TOKEN = "tok-faults-0123456789"
FAKE_TRAINER = REPO / "tests" / "service" / "fake_trainer.py"

# Milestones of one trainer attempt, in order, and the log line that marks each.
MILESTONES: list[tuple[str, re.Pattern[str] | None]] = [
    ("start", None),                                              # the process was started
    ("fetch", re.compile(r"lathe\.run: job .* attempt \d+")),     # downloading model and dataset next
    ("load", re.compile(r"lathe\.run: loading the model")),       # importing torch, loading the model
    ("training", re.compile(r"phase: training")),
    ("shrinking", re.compile(r"phase: shrinking")),
    ("uploading", re.compile(r"phase: uploading")),
]
MILESTONE_NAMES = [name for name, _ in MILESTONES]
CHECKPOINT_SAVED = re.compile(r"checkpoint at step (\d+) saved")


def fault_rng(what: str) -> tuple[random.Random, int]:
    """An RNG seeded from LATHE_FAULT_SEED, or a fresh seed; printed so a failure can be replayed."""
    env = os.environ.get("LATHE_FAULT_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"{what}: LATHE_FAULT_SEED={seed}", flush=True)
    return random.Random(seed), seed


def soak(default: int) -> int:
    """How many faults to inject: `default`, or LATHE_SOAK=N for long manual runs (never fewer)."""
    return max(default, int(os.environ.get("LATHE_SOAK") or 0))


class TrainerRun:
    """One attempt of `python -m trainer run SPEC`, in its own process group (a SIGKILL takes
    any children with it, as a container kill would)."""

    def __init__(self, spec_uri: str, env: dict[str, str], work: Path,
                 on_line: Callable[[TrainerRun, str], None] | None = None) -> None:
        self.on_line = on_line
        self.lines: list[tuple[float, str]] = []
        self.seen: dict[str, float] = {}
        self.checkpoints: list[int] = []
        self._cond = threading.Condition()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", "run", spec_uri, "--work-dir", str(work)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self.seen["start"] = self.t0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            with self._cond:
                self.lines.append((now, line.rstrip("\n")))
                for name, pattern in MILESTONES:
                    if pattern is not None and name not in self.seen and pattern.search(line):
                        self.seen[name] = now
                if m := CHECKPOINT_SAVED.search(line):
                    self.checkpoints.append(int(m.group(1)))
                self._cond.notify_all()
            if self.on_line is not None:
                self.on_line(self, line)
        with self._cond:
            self._cond.notify_all()

    def reached(self, milestone: str) -> bool:
        """`milestone` or a later one was seen (a resumed attempt may skip some)."""
        index = MILESTONE_NAMES.index(milestone)
        return any(name in self.seen for name in MILESTONE_NAMES[index:])

    def wait_milestone(self, milestone: str, timeout: float = 300) -> float | None:
        """Monotonic time the milestone (or a later one) was reached; None if the process ended first."""
        index = MILESTONE_NAMES.index(milestone)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                times = [self.seen[n] for n in MILESTONE_NAMES[index:] if n in self.seen]
                if times:
                    return min(times)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"trainer did not reach {milestone} within {timeout} s:\n{self.tail()}")
                self._cond.wait(min(left, 0.2))

    def phase_at(self, t: float) -> str:
        """The last milestone seen at monotonic time `t`."""
        at = [(when, name) for name, when in self.seen.items() if when <= t]
        return max(at)[1] if at else "start"

    def signal(self, sig: int) -> bool:
        """Sends `sig` (SIGKILL: to the whole group); False when the process had already exited."""
        if self.proc.poll() is not None:
            return False
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def output(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 60) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def job_status(endpoint: str, bucket: str, job: str) -> dict:
    return read_json(endpoint, bucket, f"tenants/t1/jobs/{job}/status.json") or {}


def checkpoint_manifests(endpoint: str, bucket: str, job: str) -> dict[int, dict]:
    """step → manifest of the job's valid checkpoints."""
    client = s3_client(endpoint)
    prefix = f"tenants/t1/jobs/{job}/checkpoints/"
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/manifest.json"):
                step = int(obj["Key"][len(prefix):].split("/")[0])
                out[step] = read_json(endpoint, bucket, obj["Key"])
    return out


def check_outputs(endpoint: str, bucket: str, job: str, steps: int, model_dir: Path, tmp_path: Path) -> dict:
    """The published set is complete and intact: metadata.json lists every object under output/
    (nothing stray from a killed attempt), each with its size and sha256; the run trained exactly
    `steps` steps, none twice; both adapters load in diffusers and change the UNet."""
    client = s3_client(endpoint)
    prefix = f"tenants/t1/jobs/{job}/output/"
    meta = read_json(endpoint, bucket, prefix + "metadata.json")
    assert meta is not None, "metadata.json (the commit marker) is missing"
    assert meta["steps"] == steps, meta["steps"]
    assert meta["loss"]["history_len"] == steps, "a step was trained twice or skipped"
    listed = {o["name"]: o for o in meta["outputs"]}
    stored = {o["Key"][len(prefix):] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    assert stored == set(listed) | {"metadata.json"}, f"stray or missing outputs: {sorted(stored ^ set(listed))}"
    local: dict[str, Path] = {}
    for name, entry in listed.items():
        body = client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"], name
        path = tmp_path / "outputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        local[name] = path
    assert {"tiny.safetensors", "tiny-shrunk.safetensors"} <= set(local)
    from safetensors import safe_open

    with safe_open(str(local["tiny.safetensors"]), "pt") as fh:
        assert fh.metadata()["ss_steps"] == str(steps)
    for name in ("tiny.safetensors", "tiny-shrunk.safetensors"):
        assert_adapter_loads(model_dir, local[name])
    return meta


def assert_adapter_loads(model_dir: Path, adapter: Path) -> None:
    """diffusers loads the file onto the tiny pipeline and fusing it changes the UNet (finitely)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, local_files_only=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    pipe.fuse_lora()
    after = pipe.unet.state_dict()
    changed = 0
    for key, value in after.items():
        assert torch.isfinite(value).all(), f"{adapter.name}: {key} is not finite after fusing"
        old = before.get(key.replace(".base_layer", ""))
        if old is not None and old.shape == value.shape and not torch.equal(old, value):
            changed += 1
    assert changed > 0, f"{adapter.name} loaded but changed no UNet weight"


# ----------------------------------------------------------------------------------- the service


class ServiceProcess:
    """`python -m service.cli serve` on 127.0.0.1:`port` with `env` (LATHE_* settings)."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.port = env, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(env["LATHE_LOCAL_DIR"]).parent / f"serve-{port}.log"

    def start(self, timeout: float = 90) -> ServiceProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not become ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def service_env(state_uri: str, tokens_file: Path, work: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": endpoint,
           "LATHE_STATE_URI": state_uri, "LATHE_TOKENS_FILE": str(tokens_file),
           "LATHE_LOCAL_DIR": str(work / "local"), "LATHE_LOCAL_CACHE_DIR": str(work / "cache"),
           "LATHE_RECONCILE_INTERVAL_S": "0.2", "LATHE_MAX_RUNNING_JOBS": "8", "LATHE_HEARTBEAT_TIMEOUT_S": "10",
           "LATHE_RETRY_BACKOFF_S": "0.1", "LATHE_TRAINER_COMMAND": f'["{sys.executable}", "{FAKE_TRAINER}"]',
           "FAKE_STEP_S": "0.01"}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    env.update(extra)
    return env


def service_spec(bucket: str, **changes: Any) -> dict[str, Any]:
    """A small valid spec for the stand-in trainer (it reads no model)."""
    return job_spec(bucket, model_prefix="models/tiny-sd1", **changes)

