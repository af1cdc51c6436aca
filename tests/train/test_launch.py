"""`python -m trainer launch`: two real `trainer run` ranks under `accelerate launch` on CPU (gloo),
the command the Kubernetes launcher gives a pod with several GPUs.

- A final failure (an empty dataset: `dataset_invalid`, 11) makes `accelerate launch` itself exit 1;
  the pod must exit 11, or Kubernetes' podFailurePolicy and the service read `internal`.
- A SIGTERM to rank 1 alone (its pod was preempted, on another node) stops both ranks at the next
  step, with a checkpoint, and the pod exits 20 (`preempted`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from train_helpers import make_spec

from tests.common_helpers import free_port, wait_for
from trainer.job.launch import pick
from trainer.core.spec import encode_spec

REPO = Path(__file__).resolve().parents[2]


def _step(job: Path) -> int:
    try:
        status = json.loads((job / "status.json").read_text())
    except (OSError, ValueError):
        return 0
    return status.get("progress", {}).get("step", 0)


def _start(spec_path: Path, root: Path, tag: str) -> subprocess.Popen[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [sys.executable, "-m", "trainer", "launch", "--",
               str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", "run", str(spec_path)]
    env = {**os.environ, "LATHE_WORK_DIR": str(root / "work"), "LATHE_CACHE_DIR": str(root / "cache"),
           "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LATHE_TEST_TAG": tag}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of `trainer run` rank `rank` of the run tagged `tag` (its environment says so)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if f"LATHE_TEST_TAG={tag}".encode() in environ and f"RANK={rank}".encode() in environ \
                and b"trainer\0run" in cmdline:
            return int(entry)
    return None


@pytest.fixture(scope="module")
def sd1(tiny_pipeline: Callable[..., str]) -> str:
    return tiny_pipeline("sd1")


def test_pick_prefers_the_code_that_explains_the_attempt() -> None:
    assert pick([], 1) == 1  # no rank recorded anything: the launcher's code stands
    assert pick([0, 0], 0) == 0
    assert pick([1, 11], 1) == 11  # a final code over a peer's `internal`
    assert pick([20, 1], 1) == 20
    assert pick([21, 20], 1) == 21


def test_a_final_exit_code_survives_accelerate_launch(sd1: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "10_cats").mkdir(parents=True)  # a concept folder without images
    job = tmp_path / "job"
    job.mkdir()
    (job / "spec.json").write_bytes(encode_spec(make_spec(sd1, str(data), resources={"gpus": 2})))
    proc = _start(job / "spec.json", tmp_path, uuid.uuid4().hex)
    out, err = proc.communicate(timeout=540)
    assert proc.returncode == 11, err[-4000:]
    # What accelerate launch itself said: 1. Both ranks recorded the trainer's 11.
    assert "ranks exited [11, 11], launcher 1; exiting 11" in err
    status = json.loads((job / "status.json").read_text())
    assert status["error"]["reason"] == "dataset_invalid"


def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(sd1: str, tiny_data: str, tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    spec = make_spec(sd1, tiny_data, resources={"gpus": 2}, logging={"log_with": "none"},
                     training={"max_train_steps": 400, "seed": 0})
    (job / "spec.json").write_bytes(encode_spec(spec))
    tag = uuid.uuid4().hex
    proc = _start(job / "spec.json", tmp_path, tag)
    wait_for(lambda: _step(job) >= 2, timeout_s=400, interval_s=0.5, what="training to run", proc=proc)
    pid = _rank_pid(tag, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)  # rank 0 is not signalled: only rank 1's pod was preempted
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 20, err[-4000:]
    status = json.loads((job / "status.json").read_text())
    assert status["phase"] == "failed" and status["error"]["reason"] == "preempted", status
    assert status["progress"]["step"] < 400
    saved = sorted(p.name for p in (job / "checkpoints").iterdir())
    # The resumable state of the step both ranks stopped at (status.json's progress may lag it by one).
    assert saved and status["progress"]["step"] <= int(saved[-1]) < 400, saved
