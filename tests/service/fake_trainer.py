"""STAND-IN for `python -m trainer run SPEC_URI` in the service's tests — not the trainer.

It speaks the trainer's contract with the service and nothing else: reads spec.json from the job
directory, writes status.json through the trainer's own StatusReporter (same revisions, heartbeat,
phases), honours the `cancel` marker and SIGTERM, publishes an output file and exits with
the trainer's exit codes (trainer/core/failures.py). It trains nothing, so the service's tests run in seconds. Behaviour comes
from the spec's `name` (one of BEHAVIOURS) and FAKE_STEP_S (seconds per step).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

from trainer.core.failures import EXIT_CODES, Reason
from trainer.core.jobdir import StatusReporter
from trainer.core.spec import decode_spec
from trainer.core.status import OutputFile
from trainer.core.storage import open_store

BEHAVIOURS = ("succeed", "fail-once", "crash-once", "fail-final", "slow")


def main(spec_uri: str) -> int:
    job_uri, _, spec_name = spec_uri.rpartition("/")
    job = open_store(job_uri + "/")
    spec = decode_spec(job.get_bytes(spec_name), format="json")
    behaviour = spec.name or "succeed"
    attempt = int(os.environ.get("LATHE_JOB_ATTEMPT", "1"))
    step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
    steps = spec.training.max_train_steps or 3
    reporter = StatusReporter(job, attempt=attempt, interval_s=0.2)
    stop = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    reporter.start()
    print(f"fake trainer: {behaviour}, attempt {attempt}, {steps} steps", flush=True)

    if behaviour == "crash-once" and attempt == 1:
        print("fake trainer: crashing without a final status", flush=True)
        reporter.close()
        return EXIT_CODES[Reason.INTERNAL]
    if behaviour == "fail-once" and attempt == 1:
        reporter.finish("failed", reason=Reason.STORAGE_ERROR.value, message="fake: object store went away")
        return EXIT_CODES[Reason.STORAGE_ERROR]
    if behaviour == "fail-final":
        reporter.finish("failed", reason=Reason.DATASET_INVALID.value, message="fake: 10_cat/x.png is not an image")
        return EXIT_CODES[Reason.DATASET_INVALID]

    reporter.set_phase("training")
    for step in range(1, steps + 1):
        time.sleep(step_s)
        if reporter.cancel_requested or stop["sigterm"]:
            reason = Reason.CANCELLED if reporter.cancel_requested else Reason.PREEMPTED
            print(f"fake trainer: stopping at step {step} ({reason.value})", flush=True)
            reporter.finish("cancelled" if reason == Reason.CANCELLED else "failed", reason=reason.value,
                            message=f"stopped at step {step}; checkpoint saved")
            return EXIT_CODES[reason]
        reporter.progress(step=step, total_steps=steps, epoch=1, total_epochs=1, loss=1.0 / step,
                          avg_loss=1.0 / step, lr=1e-4, it_per_s=1 / step_s, eta_s=(steps - step) * step_s)
        print(f"step {step}/{steps} loss {1.0 / step:.4f}", flush=True)
    reporter.set_phase("uploading")
    out = job.child("output/")
    data = f"fake adapter of {spec_uri}".encode()
    out.put_bytes("last.safetensors", data)
    output = OutputFile(name="last.safetensors", uri=out.uri("last.safetensors"), size=len(data),
                        sha256=hashlib.sha256(data).hexdigest(), kind="adapter")
    out.put_json("metadata.json", {"outputs": [output]})
    reporter.set_outputs([output])
    reporter.finish("succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
