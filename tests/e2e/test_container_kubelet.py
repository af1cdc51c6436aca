"""The e2e node without a Docker engine (part of `make test`): the stand-in's Job controller and kubelet
drive `DockerRuntime` against a `docker` CLI stand-in (fake_docker.py), on Jobs the real launcher
created. What is checked: the pod's spec becomes the `docker run` the e2e relies on, and the engine's
answers (exit codes, `docker kill`, OOM events, a missing image) become the pod and Job states a node
and the Job controller would write."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from container_kubelet import ContainerConfigError, DockerRuntime, docker_run_argv, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
from fake_apiserver import FakeApiServer  # noqa: E402
from k8s_helpers import JOB_ID, SPEC_URI, make_request  # noqa: E402
from kubelet import Kubelet, command_line  # noqa: E402

from service.launchers.k8s.launcher import KubernetesLauncher  # noqa: E402
from service.launchers.k8s.settings import KubernetesSettings  # noqa: E402

IMAGE = "lathe-trainer:local-cpu"
SECRETS = {"lathe-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}}
FAKE_DOCKER = Path(__file__).with_name("fake_docker.py")
JOB = f"{JOB_ID}-a1"


@dataclass
class Node:
    api: FakeApiServer
    runtime: DockerRuntime
    kubelet: Kubelet
    launcher: KubernetesLauncher
    engine: Path  # the fake engine's state folder

    def pods(self, job: str = JOB) -> list[dict[str, Any]]:
        return sorted(self.api.pods_of("lathe", job), key=lambda p: p["metadata"]["name"])

    def started(self, n: int = 1) -> list[Any]:
        """Passes until `n` containers run (their `docker run` recorded its arguments)."""
        def up() -> list[Any] | None:
            self.kubelet.run_until_settled(1)
            runs = list(self.runtime.runs.values())
            return runs if len(runs) >= n and all((self.engine / f"{r.name}.argv").exists() for r in runs) else None
        return wait_until(up, 30, f"{n} container(s) to start", interval_s=0.05)

    def settle(self, what: str, predicate: Any) -> Any:
        def check() -> Any:
            self.kubelet.run_until_settled(1)
            return predicate()
        return wait_until(check, 30, what, interval_s=0.05)

    def job(self, name: str = JOB) -> dict[str, Any] | None:
        return self.api.get("jobs", "lathe", name)


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "images.json").write_text(json.dumps({IMAGE: "1000:1000", "root-image:1": ""}))
    cli = tmp_path / "docker"
    cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_DOCKER}" "$@"\n')
    cli.chmod(0o755)
    monkeypatch.setenv("DOCKER_BIN", str(cli))
    monkeypatch.setenv("FAKE_DOCKER_DIR", str(engine))
    with FakeApiServer(namespaces=("lathe",)) as api:
        runtime = DockerRuntime(api, workdir=tmp_path / "node", label=("lathe-e2e", "t"))
        launcher = KubernetesLauncher(KubernetesSettings(
            s3_secret_name="lathe-s3", s3_endpoint="http://127.0.0.1:9000", trainer_image=IMAGE, termination_grace_s=30),
            k8s.ApiClient(k8s.Configuration(host=api.url)), sleep=lambda s: None)
        try:
            yield Node(api, runtime, Kubelet(api, runtime, secrets=SECRETS), launcher, engine)
        finally:
            runtime.remove_all()


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def _conditions(job: dict[str, Any] | None) -> dict[str, str]:
    return {c["type"]: c["reason"] for c in (job or {}).get("status", {}).get("conditions", []) if c["status"] == "True"}


def test_a_pod_runs_as_a_locked_down_container_to_a_complete_job(node: Node) -> None:
    node.launcher.submit(make_request({"gpus": 0}))
    (run,) = node.started()
    argv = run.argv
    assert json.loads((node.engine / f"{run.name}.argv").read_text()) == argv  # what the engine got
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert argv[argv.index("--group-add") + 1] == "1000"  # fsGroup
    assert "--read-only" in argv and argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--security-opt") + 1] == "no-new-privileges"
    assert argv[argv.index("--network") + 1] == "host" and argv[argv.index("--label") + 1] == "lathe-e2e=t"
    mounts = dict(argv[i + 1].split(":")[1::-1] for i, a in enumerate(argv) if a == "-v")  # mount path → folder
    assert set(mounts) == {"/scratch", "/cache/models"}
    for folder in mounts.values():  # an emptyDir: a fresh folder, group fsGroup, writable by all, setgid
        stat = Path(folder).stat()
        assert (stat.st_gid, stat.st_mode & 0o7777) == (1000, 0o2777) and not any(Path(folder).iterdir())
    assert argv[argv.index("--shm-size") + 1] == str(16 << 30)
    # command replaces the ENTRYPOINT, args follow the image
    assert argv[argv.index("--entrypoint"):] == ["--entrypoint", "python", IMAGE, "-m", "trainer", "run", SPEC_URI]
    env_file = Path(argv[argv.index("--env-file") + 1])
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env["AWS_ACCESS_KEY_ID"] == "id" and env["AWS_SECRET_ACCESS_KEY"] == "secret"  # from the Secret
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["HOME"] == "/scratch"
    assert "AWS_SESSION_TOKEN" not in env  # optional key, absent from the Secret
    assert env_file.stat().st_mode & 0o077 == 0
    (pod,) = node.pods()
    assert pod["status"]["phase"] == "Running"

    (node.engine / f"{run.name}.exit").write_text("0")
    node.settle("the Job to complete", lambda: "Complete" in _conditions(node.job()))
    (pod,) = node.pods()
    assert pod["status"]["phase"] == "Succeeded" and _terminated(pod)["exitCode"] == 0
    assert f"{run.name}: started" in node.api.logs[("lathe", pod["metadata"]["name"])]  # the pod log
    assert node.job()["status"]["succeeded"] == 1


def test_ranks_get_their_index_and_rank0_address(node: Node) -> None:
    node.launcher.submit(make_request({"gpus": 1, "nodes": 2}))
    runs = node.started(2)
    rank0 = f"{JOB}-0.{JOB}.lathe.svc"
    for pod in node.pods():
        index = int(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
        argv = node.runtime.runs[pod["metadata"]["name"]].argv
        assert argv[argv.index("--machine_rank") + 1] == str(index)  # $(LATHE_MACHINE_RANK), by the kubelet
        assert f"{rank0}:127.0.0.1" in argv  # the headless Service's name for rank 0
        assert f"JOB_COMPLETION_INDEX={index}" in Path(argv[argv.index("--env-file") + 1]).read_text()
    assert len(runs) == 2


def test_a_killed_container_is_exit_137_and_fails_the_attempt(node: Node) -> None:
    node.launcher.submit(make_request({"gpus": 0}))
    (run,) = node.started()
    (node.engine / f"{run.name}.signal").write_text("KILL")  # `docker kill` from outside
    node.settle("the Job to fail", lambda: "Failed" in _conditions(node.job()))
    (pod,) = node.pods()
    assert _terminated(pod)["exitCode"] == 137 and _terminated(pod)["reason"] == "Error"
    assert f"{run.name}: started" in _terminated(pod)["message"]  # FallbackToLogsOnError
    # Jobs are launched with backoffLimit 0: the service retries, never the Job controller.
    assert _conditions(node.job()) == {"FailureTarget": "BackoffLimitExceeded", "Failed": "BackoffLimitExceeded"}
    assert len(node.pods()) == 1


def test_an_oom_event_makes_the_pod_oomkilled(node: Node) -> None:
    node.launcher.submit(make_request({"gpus": 0}))
    (run,) = node.started()
    (node.engine / f"{run.name}.oom").touch()
    (node.engine / f"{run.name}.signal").write_text("KILL")
    node.settle("the pod to end", lambda: node.pods()[0]["status"]["phase"] == "Failed")
    assert _terminated(node.pods()[0])["reason"] == "OOMKilled" and run.oom_killed


def test_a_deleted_pod_gets_sigterm_then_sigkill_after_its_grace_period(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DOCKER_SIGTERM_EXIT", "")  # a trainer that does not stop on SIGTERM
    node.launcher.submit(make_request({"gpus": 0}))
    (run,) = node.started()
    node.launcher.cancel("acme", JOB_ID, 1)  # deletes the Job (Foreground): its pod is deleted gracefully
    for _ in range(3):
        node.kubelet.run_until_settled(1)
    assert (node.engine / f"{run.name}.signal").read_text() == "TERM" and run.poll() is None
    node.api.advance(30)  # terminationGracePeriodSeconds
    node.settle("the Job and its pod to be gone", lambda: node.job() is None and not node.pods())
    assert run.poll() == 137 and (node.engine / f"{run.name}.signal").read_text() == "KILL"


def test_a_sigterm_before_the_container_runs_is_delivered_once_it_does(node: Node) -> None:
    node.launcher.submit(make_request({"gpus": 0}))
    (run,) = node.started()
    (node.engine / f"{run.name}.done").touch()  # the engine does not have the container (yet)
    run.signal(signal.SIGTERM)
    assert not (node.engine / f"{run.name}.signal").exists()
    (node.engine / f"{run.name}.done").unlink()
    wait_until(lambda: run.poll() is not None, 30, "the retried SIGTERM to stop it", interval_s=0.2)
    assert run.poll() == 20  # the trainer's "preempted, checkpoint saved"


def test_what_a_node_would_refuse_is_refused(node: Node, tmp_path: Path) -> None:
    node.kubelet.secrets = {}
    node.launcher.submit(make_request({"gpus": 0}))
    node.kubelet.run_until_settled(2)  # scheduled, then started
    (pod,) = node.pods()
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {"reason": "CreateContainerConfigError", "message": "secret lathe-s3/AWS_ACCESS_KEY_ID missing"}
    assert not node.runtime.runs

    c = pod["spec"]["containers"][0]
    argv = command_line(pod, "trainer", SECRETS)

    def run_argv(p: dict[str, Any], image_user: str = "1000:1000") -> list[str]:
        return docker_run_argv(p, p["spec"]["containers"][0], argv, env_file=tmp_path / "env",
                               volume_root=tmp_path / "vol", name="c", labels={}, hosts=[], image_user=image_user)

    root = {**pod, "spec": {**pod["spec"], "securityContext": {"runAsNonRoot": True},
                            "containers": [{**c, "securityContext": {}}]}}
    with pytest.raises(ContainerConfigError, match="runAsNonRoot and image will run as root"):
        run_argv(root, image_user="")


def test_a_volume_kind_the_node_lacks_is_a_config_error(node: Node) -> None:
    node.launcher.submit(make_request({"gpus": 0}))
    with node.api._lock:  # the template as a manifest needing a PersistentVolumeClaim would have it
        volumes = node.api.objects[("jobs", "lathe", JOB)]["spec"]["template"]["spec"]["volumes"]
        volumes[:] = [v if v["name"] != "model-cache" else {"name": "model-cache", "persistentVolumeClaim": {
            "claimName": "models"}} for v in volumes]
    node.kubelet.run_until_settled(2)
    waiting = node.pods()[0]["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError", waiting
    assert "persistentVolumeClaim volumes are not supported" in waiting["message"] and not node.runtime.runs


def test_an_image_the_engine_lacks_is_an_image_pull_error(node: Node) -> None:
    (node.engine / "images.json").write_text(json.dumps({}))
    node.launcher.submit(make_request({"gpus": 0}))
    node.kubelet.run_until_settled(2)  # scheduled, then started
    waiting = node.pods()[0]["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ErrImagePull" and "make images" in waiting["message"]
    node.kubelet.run_until_settled(1)
    assert node.pods()[0]["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
