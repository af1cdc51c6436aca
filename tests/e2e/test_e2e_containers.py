"""The whole chain in containers, as Kubernetes would run it (`make e2e`; needs root, Docker and the
images of `make images`).

The service image runs `lathe serve` (read-only root, UID 1000) with the kubernetes launcher against
the API stand-in; the stand-in's Job controller makes the pods of each Job the launcher created and
its kubelet runs each as a trainer container built from that pod's spec (tests/e2e/container_kubelet.py);
jobs are submitted, cancelled and pulled with the `lathe` CLI of the service image. In order: a job succeeds and its
outputs check out by sha256; a job killed after its first checkpoint resumes in attempt 2 from it;
a job is cancelled; a 2-node job trains over gloo across two trainer containers.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("LATHE_E2E") != "1":
    pytest.skip("container end-to-end: `make e2e` runs it (root, Docker, buildah; builds the images first)",
                allow_module_level=True)

from container_kubelet import Cluster, DockerRuntime, docker, wait_until  # noqa: E402
from e2e_helpers import (  # noqa: E402
    LABEL_KEY, NAMESPACE, SECRET, SERVICE_IMAGE, TRAINER_IMAGE, Stack, make_spec, record_figure, require_images,
    seconds_until, seed_assets, sha256,
)
from fake_apiserver import FakeApiServer  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_images()
    work = tmp_path_factory.mktemp("e2e")
    run_id = f"lathe-e2e-{uuid.uuid4().hex[:8]}"
    bucket = "lathe-e2e"
    with FakeApiServer(namespaces=(NAMESPACE,)) as api:
        runtime = DockerRuntime(api, workdir=work / "kubelet", label=(LABEL_KEY, run_id))
        cluster = Cluster(api, runtime, secrets={
            SECRET: {"AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e", "AWS_REGION": "us-east-1"}})
        st = Stack(work=work, s3_endpoint=s3_server, bucket=bucket, token="e2e-" + uuid.uuid4().hex, api=api,
                   cluster=cluster, run_id=run_id)
        st.s3().create_bucket(Bucket=bucket)
        seed_assets(work, st.s3(), bucket)
        cluster.start()
        try:
            st.start_service()
            yield st
        finally:
            st.stop()
    # `--rm` containers are removed by the engine just after they exit.
    wait_until(lambda: not docker("ps", "-aq", "--filter", f"label={LABEL_KEY}={run_id}", check=False).stdout.split(),
               120, "the run's containers to be removed")


def _pod(stack: Stack, job: str, index: int | None = None) -> dict:
    """The pod of `job` (its last state, also once the service deleted the Job)."""
    pods = [p for (kind, _), p in sorted(stack.cluster.seen.items())
            if kind == "pods" and p["metadata"].get("labels", {}).get("job-name") == job]
    if index is not None:
        pods = [p for p in pods if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == str(index)]
    assert len(pods) == 1, f"{job}: expected one pod, got {[p['metadata']['name'] for p in pods]}"
    return pods[0]


def _terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def _condition(job: dict, kind: str) -> dict | None:
    return next((c for c in job.get("status", {}).get("conditions", []) if c["type"] == kind and c["status"] == "True"), None)


def _wait_condition(stack: Stack, job: str, kind: str) -> dict:
    return wait_until(lambda: _condition(stack.cluster.seen.get(("jobs", job)) or {}, kind), 120,
                      f"Job {job} to be {kind}")


def _check_outputs(stack: Stack, job_id: str, steps: int, pulled: Path | None = None) -> dict:
    prefix = stack.job_prefix(job_id) + "output/"
    meta = stack.read_json(prefix + "metadata.json")
    assert meta["steps"] == steps and meta["loss"]["history_len"] == steps, (meta["steps"], meta["loss"])
    listed = {o["name"]: o for o in meta["outputs"]}
    stored = {k[len(prefix):] for k in stack.keys(prefix)}
    assert stored == set(listed) | {"metadata.json"}, f"stray or missing outputs: {sorted(stored ^ set(listed))}"
    if pulled is not None:
        for name, entry in listed.items():
            path = pulled / name
            assert path.is_file(), f"lathe pull did not write {name}"
            assert path.stat().st_size == entry["size"] and sha256(path) == entry["sha256"], name
    return meta


def test_a_job_runs_in_the_trainer_image_to_checked_outputs(stack: Stack, tmp_path: Path) -> None:
    job_id = stack.submit(make_spec(stack.bucket, "e2e-ok", 6))
    view = stack.wait_phase(job_id, ("succeeded", "failed", "cancelled"), 420)
    assert view["phase"] == "succeeded", stack.explain(view)

    # The trainer reports success before its process ends; the Job completes when the container exits.
    _wait_condition(stack, f"{job_id}-a1", "Complete")
    pod = _pod(stack, f"{job_id}-a1")
    assert pod["status"]["phase"] == "Succeeded" and _terminated(pod)["exitCode"] == 0
    # The container was the pod spec's: image, user, read-only root, no capabilities, the emptyDirs.
    run = stack.cluster.runtime.runs[pod["metadata"]["name"]]
    argv = run.argv
    assert TRAINER_IMAGE in argv and "--read-only" in argv
    assert argv[argv.index("--user") + 1] == "1000:1000" and argv[argv.index("--cap-drop") + 1] == "ALL"
    mounts = [argv[i + 1].split(":")[1] for i, a in enumerate(argv) if a == "-v"]
    assert sorted(mounts) == ["/cache/models", "/scratch"], mounts

    record_figure("trainer container start to first training step (s)",
                  seconds_until(run.logs(), r"lathe\.train: training: ", run.created_wall))
    record_figure("trainer container start to job succeeded (s)",
                  seconds_until(run.logs(), r"job succeeded", run.created_wall))

    out = tmp_path / "pulled"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # written by UID 1000 in the CLI container
    stack.lathe("pull", job_id, "/out", mounts=((out, "/out", "rw"),))
    meta = _check_outputs(stack, job_id, 6, pulled=out)
    assert {"e2e-ok.safetensors"} <= {o["name"] for o in meta["outputs"]}
    assert "loading the model" in stack.lathe("logs", job_id)  # the pod log, read through the API stand-in


def test_the_service_image_has_no_torch(stack: Stack) -> None:
    probe = docker("run", "--rm", "--label", f"{LABEL_KEY}={stack.run_id}", "--network", "none", "--entrypoint",
                   "python", SERVICE_IMAGE, "-c", "import torch", check=False)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr


def test_a_killed_trainer_resumes_from_its_checkpoint_in_the_next_attempt(stack: Stack) -> None:
    steps = 40
    job_id = stack.submit(make_spec(stack.bucket, "e2e-resume", steps, save={"checkpoint_every_n_steps": 4},
                                    resources={"max_attempts": 2}))
    checkpoints = stack.job_prefix(job_id) + "checkpoints/"
    wait_until(lambda: any(k.endswith("/manifest.json") for k in stack.keys(checkpoints)) or stack.check_alive(),
               420, f"the first checkpoint of {job_id}", interval_s=0.3)
    pod = _pod(stack, f"{job_id}-a1")
    docker("kill", stack.cluster.runtime.runs[pod["metadata"]["name"]].name)  # SIGKILL, as a node loss or OOM would

    view = stack.wait_phase(job_id, ("succeeded", "failed", "cancelled"), 480)
    assert view["phase"] == "succeeded", stack.explain(view)
    assert [a["attempt"] for a in view["attempts"]] == [1, 2], view["attempts"]
    killed = _pod(stack, f"{job_id}-a1")
    assert killed["status"]["phase"] == "Failed", killed["status"]
    assert _terminated(killed)["exitCode"] == 137 and _terminated(killed)["reason"] == "Error"
    _wait_condition(stack, f"{job_id}-a1", "Failed")
    log = stack.cluster.runtime.runs[_pod(stack, f"{job_id}-a2")["metadata"]["name"]].logs()
    resumed = re.search(r"resuming from checkpoint at step (\d+)", log)
    assert resumed and 0 < int(resumed[1]) < steps, log[-3000:]
    assert any(f"resumed from the checkpoint at step {resumed[1]}" in w for w in view["warnings"]), view["warnings"]
    _check_outputs(stack, job_id, steps)


def test_a_cancelled_job_stops_its_container_and_publishes_nothing(stack: Stack) -> None:
    job_id = stack.submit(make_spec(stack.bucket, "e2e-cancel", 2000, save={"checkpoint_every_n_steps": 500}))
    wait_until(lambda: (stack.job(job_id)["progress"].get("step") or 0) >= 1 or stack.check_alive(), 420,
               f"{job_id} to train a step", interval_s=1)
    pod = _pod(stack, f"{job_id}-a1")["metadata"]["name"]
    stack.lathe("cancel", job_id)
    view = stack.wait_phase(job_id, ("succeeded", "failed", "cancelled"), 240)
    assert view["phase"] == "cancelled", stack.explain(view)
    # The trainer saw the cancel marker, checkpointed and exited 22, a final code: podFailurePolicy
    # fails the Job at once (the launcher deletes it only when a trainer ignores the marker).
    failed = _wait_condition(stack, f"{job_id}-a1", "Failed")
    assert failed["reason"] == "PodFailurePolicy", failed
    assert _terminated(_pod(stack, f"{job_id}-a1"))["exitCode"] == 22
    assert stack.cluster.runtime.runs[pod].poll() is not None
    outputs = stack.keys(stack.job_prefix(job_id) + "output/")
    assert not [k for k in outputs if k.endswith((".safetensors", "metadata.json"))], outputs


def test_two_nodes_train_over_gloo_as_an_indexed_job(stack: Stack) -> None:
    job_id = stack.submit(make_spec(stack.bucket, "e2e-2nodes", 4, resources={"gpus": 1, "nodes": 2}))
    view = stack.wait_phase(job_id, ("succeeded", "failed", "cancelled"), 480)
    assert view["phase"] == "succeeded", stack.explain(view)
    name = f"{job_id}-a1"
    _wait_condition(stack, name, "Complete")
    assert stack.api.get("jobs", NAMESPACE, name)["spec"]["completionMode"] == "Indexed"
    assert stack.api.get("services", NAMESPACE, name) is not None
    rank0 = f"{name}-0.{name}.{NAMESPACE}.svc"
    for index in (0, 1):
        pod = _pod(stack, name, index)
        assert _terminated(pod)["exitCode"] == 0
        run = stack.cluster.runtime.runs[pod["metadata"]["name"]]
        argv = run.argv
        assert f"{rank0}:127.0.0.1" in argv  # rank 0's DNS name, from the headless Service
        assert argv[argv.index("--machine_rank") + 1] == str(index)
        log = run.logs()
        assert f"(rank {index}/2)" in log, log[-3000:]
    _check_outputs(stack, job_id, 4)
