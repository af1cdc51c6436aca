"""The object store unreachable for 10 s at three moments of one job: while the model downloads,
while a checkpoint uploads, and while the outputs upload. The job finishes, with intact outputs.

The trainer talks to the S3 server through the session's cuttable proxy (tests/conftest.py): an
outage refuses new connections and resets open ones, as a stopped server does. The test itself reads
the server directly. Each outage starts the moment the trainer logs the operation's start.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from tests.faults.fault_helpers import TrainerRun, check_outputs, job_status, trainer_env
from tests.lifecycle.lifecycle_helpers import make_spec, put_spec

pytestmark = pytest.mark.slow

OUTAGE_S = float(os.environ.get("LATHE_FAULT_OUTAGE_S", "10"))
STEPS = 8
# (name, the log line that starts it, the log line that ends the operation it must delay)
OUTAGES = [
    ("model download", re.compile(r"downloading model"), re.compile(r"loading the model")),
    ("checkpoint upload", re.compile(r"saving a checkpoint at step 4\b"), re.compile(r"checkpoint at step 4 saved")),
    ("output upload", re.compile(r"phase: uploading"), re.compile(r"phase: succeeded|job succeeded")),
]


def test_job_survives_s3_outages_during_download_checkpoint_and_upload(
        s3_server, s3_proxy, fault_bucket, fault_assets, tmp_path):
    job = "j-outages"
    uri = put_spec(s3_server, fault_bucket, job, make_spec(fault_bucket, **{
        "training.max_train_steps": STEPS, "save.checkpoint_every_n_steps": 2}))
    lock = threading.Lock()  # one outage at a time (the proxy has one listener)
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    threads: list[threading.Thread] = []

    def outage(name: str) -> None:
        with lock:
            started[name] = time.monotonic()
            s3_proxy.outage(OUTAGE_S)

    def on_line(run: TrainerRun, line: str) -> None:
        now = time.monotonic()
        for name, begin, end in OUTAGES:
            if name not in started and name not in [t.name for t in threads] and begin.search(line):
                thread = threading.Thread(target=outage, args=(name,), name=name, daemon=True)
                threads.append(thread)
                thread.start()
            if name in started and name not in ended and end.search(line):
                ended[name] = now

    env = trainer_env(s3_proxy.endpoint, tmp_path / "cache", attempt=1)  # an empty cache: the model is downloaded
    run = TrainerRun(uri, env, tmp_path / "work", on_line=on_line)
    try:
        code = run.wait(timeout=600)
    finally:
        run.close()
    for thread in threads:
        thread.join(OUTAGE_S + 5)
    took = {name: ended.get(name, time.monotonic()) - started[name] for name in started}
    print(f"outages of {OUTAGE_S:.0f} s: " + ", ".join(f"{n} delayed {s:.1f} s" for n, s in took.items())
          + f"; the job ran {time.monotonic() - run.t0:.0f} s")
    assert code == 0, run.tail()
    assert set(started) == {name for name, _, _ in OUTAGES}, f"outages started: {started}\n{run.tail()}"
    for name, seconds in took.items():  # the operation really waited the outage out
        assert seconds >= OUTAGE_S * 0.8, f"{name} took {seconds:.1f} s: the outage missed it\n{run.tail()}"
    status = job_status(s3_server, fault_bucket, job)
    assert status["phase"] == "succeeded" and status["progress"]["step"] == STEPS, status
    check_outputs(s3_server, fault_bucket, job, STEPS, fault_assets["model"], tmp_path)
