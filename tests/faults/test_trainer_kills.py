"""One job, its trainer interrupted at random moments of every phase and restarted each time, as
preemptible GPU nodes do: then it finishes with the exact step count and intact, loadable outputs.

The kill moments are milestones of the trainer's log (start, fetch, load, training, shrinking,
uploading) plus a random delay, drawn from a seeded RNG (`LATHE_FAULT_SEED` replays a run); every
phase gets at least one kill. One interruption, the first in training, is a SIGTERM instead: it must
leave a fresh checkpoint and exit (preempted) well inside the grace period Kubernetes gives the pod.
Each restart runs in a fresh work folder (a new pod) or the killed one's (the container restarted in
its pod), with the node's model cache kept or lost. `LATHE_SOAK=N` kills N times instead of 10.
"""

from __future__ import annotations

import signal
import time

import msgspec
import pytest
import yaml

from service.launchers.k8s.settings import KubernetesSettings
from tests.faults.fault_helpers import (
    MILESTONE_NAMES, REPO, TrainerRun, check_outputs, checkpoint_manifests, fault_rng, job_status, soak, trainer_env,
)
from tests.lifecycle.lifecycle_helpers import make_spec, put_spec

# About 90 s a kill on a busy 2-core machine in the worst case; LATHE_SOAK=N scales it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(900, 90 * soak(10)))]

STEPS = 10
# Seconds after a milestone a kill may land (the phase usually lasts about that long here; a tiny step
# takes 0.1-0.5 s). The SIGTERM lands early in training, so that steps are left to preempt.
WINDOWS = {"start": (0.1, 1.5), "fetch": (0.0, 1.0), "load": (0.0, 6.0), "training": (0.0, 1.5),
           "shrinking": (0.0, 1.0), "uploading": (0.0, 0.1)}
SIGTERM_WINDOW = (0.0, 0.5)


def grace_periods() -> dict[str, int]:
    """terminationGracePeriodSeconds of trainer pods: the chart's value, the launcher's default, and
    the least the settings accept."""
    values = yaml.safe_load((REPO / "helm" / "lathe" / "values.yaml").read_text())
    field = next(f for f in msgspec.structs.fields(KubernetesSettings) if f.name == "termination_grace_s")
    minimum = min(m.ge for m in field.type.__metadata__ if getattr(m, "ge", None) is not None)
    return {"helm values.yaml": values["trainer"]["terminationGracePeriodSeconds"],
            "KubernetesSettings default": field.default, "least allowed": minimum}


def test_killed_at_random_moments_in_every_phase_the_job_still_finishes_exactly(
        s3_server, fault_bucket, fault_assets, tmp_path):
    rng, seed = fault_rng("trainer kills")
    kills = soak(10)
    # Every phase once plus a second training kill (the first one is the SIGTERM); the rest in the
    # start-up phases, where most of a tiny job's life goes and kills cost least (a kill in training or
    # later costs a whole start of torch), or anywhere with LATHE_SOAK. In phase order, since each
    # attempt resumes where the last one stopped.
    extra_from = MILESTONE_NAMES if kills > 10 else MILESTONE_NAMES[:3]
    plan = MILESTONE_NAMES + ["training"]
    plan = sorted(plan + [rng.choice(extra_from) for _ in range(kills - len(plan))], key=MILESTONE_NAMES.index)
    job = "j-kills"
    uri = put_spec(s3_server, fault_bucket, job, make_spec(fault_bucket, **{
        "training.max_train_steps": STEPS, "save.checkpoint_every_n_steps": 2, "save.save_every_n_steps": 3}))
    cache, work = tmp_path / "cache-0", tmp_path / "work-0"
    grace = grace_periods()
    report: list[str] = []
    sigterm_s: float | None = None
    attempt = 0
    t_start = time.monotonic()
    for i, phase in enumerate(plan):
        attempt += 1
        if i and rng.random() < 0.5:
            work = tmp_path / f"work-{attempt}"  # a new pod; else the container restarted in the same pod
        if rng.random() < 0.2:
            cache = tmp_path / f"cache-{attempt}"  # another node: no model cache
        run = TrainerRun(uri, trainer_env(s3_server, cache, attempt), work)
        try:
            reached = run.wait_milestone(phase)
            assert reached is not None, (f"seed {seed}: attempt {attempt} ended ({run.proc.returncode}) before "
                                         f"{phase}:\n{run.tail()}")
            use_sigterm = sigterm_s is None and phase == "training"
            delay = rng.uniform(*(SIGTERM_WINDOW if use_sigterm else WINDOWS[phase]))
            time.sleep(max(0.0, reached + delay - time.monotonic()))
            sent, sent_wall = time.monotonic(), time.time()
            landed = run.phase_at(sent)
            if not run.signal(signal.SIGTERM if use_sigterm else signal.SIGKILL):
                pytest.fail(f"seed {seed}: attempt {attempt} exited ({run.proc.returncode}) before the {phase} "
                            f"kill at +{delay:.2f} s:\n{run.tail()}")
            code = run.wait(timeout=120)
            exited = time.monotonic()
        finally:
            run.close()
        what = "SIGTERM" if use_sigterm else "SIGKILL"
        report.append(f"attempt {attempt}: {what} at {phase}+{delay:.2f}s (in {landed}), after checkpoints "
                      f"{run.checkpoints or '-'}, attempt ran {exited - run.t0:.1f} s, exit {code}")
        if use_sigterm:
            sigterm_s = exited - sent
            assert code == 20, f"seed {seed}: SIGTERM in training must exit 20 (preempted), got {code}:\n{run.tail()}"
            status = job_status(s3_server, fault_bucket, job)
            assert status["phase"] == "failed" and status["error"]["reason"] == "preempted", status
            fresh = [s for s, m in checkpoint_manifests(s3_server, fault_bucket, job).items()
                     if m["created_at"] >= sent_wall and m["attempt"] == attempt]
            assert fresh, f"seed {seed}: SIGTERM left no new checkpoint:\n{run.tail()}"
            assert sigterm_s < min(grace.values()), (sigterm_s, grace)
        else:
            assert code == -signal.SIGKILL, f"seed {seed}: attempt {attempt} exit {code}:\n{run.tail()}"

    attempt += 1
    final = TrainerRun(uri, trainer_env(s3_server, cache, attempt), tmp_path / f"work-{attempt}")
    try:
        code = final.wait(timeout=600)
    finally:
        final.close()
    report.append(f"attempt {attempt}: ran to the end in {time.monotonic() - final.t0:.1f} s, exit {code}")
    print("\n".join(report))
    print(f"SIGTERM → exit in {sigterm_s:.2f} s; grace periods {grace}; whole run {time.monotonic() - t_start:.0f} s")
    assert code == 0, f"seed {seed}:\n{final.tail()}"
    status = job_status(s3_server, fault_bucket, job)
    assert status["phase"] == "succeeded" and status["progress"]["step"] == STEPS, status
    assert status["attempt"] == attempt
    meta = check_outputs(s3_server, fault_bucket, job, STEPS, fault_assets["model"], tmp_path)
    saves = {o["name"] for o in meta["outputs"] if o["kind"] == "adapter_step"}
    assert saves >= {f"tiny-step{s:08d}.safetensors" for s in (3, 6, 9)}, saves
