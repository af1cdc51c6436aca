"""The container kubelet's translation of a pod into `docker run`, without a Docker engine (part of
`make test`): the pod comes from a Job the real launcher created on the API stand-in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from kubernetes import client as k8s

from container_kubelet import PodConfigError, docker_run_argv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
from fake_apiserver import FakeApiServer  # noqa: E402
from k8s_helpers import SPEC_URI, make_request  # noqa: E402

from service.k8s.launcher import KubernetesLauncher  # noqa: E402
from service.k8s.settings import KubernetesSettings  # noqa: E402

SECRETS = {"lathe-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}}


def _pods(resources: dict, **settings: object) -> tuple[FakeApiServer, list[dict]]:
    api = FakeApiServer(namespaces=("lathe",)).__enter__()
    client = k8s.ApiClient(k8s.Configuration(host=api.url))
    launcher = KubernetesLauncher(KubernetesSettings(s3_secret_name="lathe-s3", s3_endpoint="http://127.0.0.1:9000",
                                                     **settings), client, sleep=lambda s: None)
    launcher.submit(make_request(resources))
    api.sync_jobs()
    pods = sorted(api.pods_of("lathe", "j-20261123t101500-ab12cd34-a1"), key=lambda p: p["metadata"]["name"])
    return api, pods


def _argv(pod: dict, tmp_path: Path, secrets: dict = SECRETS, hosts: list[str] | None = None) -> list[str]:
    return docker_run_argv(pod, "trainer", secrets=secrets, env_file=tmp_path / "env", volume_root=tmp_path / "vol",
                           name="c", labels={"k": "v"},
                           hosts=hosts or [], image_user="1000:1000")


def test_a_single_node_pod_becomes_a_locked_down_container(tmp_path: Path) -> None:
    api, (pod,) = _pods({"gpus": 0}, trainer_image="lathe-trainer:local-cpu", termination_grace_s=30)
    try:
        argv = _argv(pod, tmp_path)
    finally:
        api.__exit__(None, None, None)
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert argv[argv.index("--group-add") + 1] == "1000"  # fsGroup
    assert "--read-only" in argv and argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--security-opt") + 1] == "no-new-privileges"
    mounts = dict(argv[i + 1].split(":")[1::-1] for i, a in enumerate(argv) if a == "-v")  # mount path → folder
    assert set(mounts) == {"/scratch", "/cache/models"}
    for folder in mounts.values():  # an emptyDir: a fresh folder, group fsGroup, writable by all, setgid
        stat = Path(folder).stat()
        assert (stat.st_gid, stat.st_mode & 0o7777) == (1000, 0o2777) and not any(Path(folder).iterdir())
    assert argv[argv.index("--shm-size") + 1] == str(16 << 30)
    assert argv[-6:] == ["--entrypoint", "python", "lathe-trainer:local-cpu", "-m", "trainer", "run", SPEC_URI][-6:]
    assert argv[argv.index("--entrypoint") + 1] == "python"
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert env["AWS_ACCESS_KEY_ID"] == "id" and env["AWS_SECRET_ACCESS_KEY"] == "secret"  # from the Secret
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["HOME"] == "/scratch"
    assert "AWS_SESSION_TOKEN" not in env  # optional key, absent from the Secret
    assert (tmp_path / "env").stat().st_mode & 0o077 == 0


def test_ranks_get_their_index_and_rank0_address(tmp_path: Path) -> None:
    api, pods = _pods({"gpus": 1, "nodes": 2})
    try:
        argvs = [_argv(p, tmp_path, hosts=["x.svc"]) for p in pods]
    finally:
        api.__exit__(None, None, None)
    for index, argv in enumerate(argvs):
        assert argv[argv.index("--machine_rank") + 1] == str(index)  # $(LATHE_MACHINE_RANK) expanded
        assert "x.svc:127.0.0.1" in argv


def test_what_a_node_would_refuse_is_refused(tmp_path: Path) -> None:
    api, (pod,) = _pods({"gpus": 0})
    api.__exit__(None, None, None)
    with pytest.raises(PodConfigError, match="lathe-s3/AWS_ACCESS_KEY_ID missing"):
        _argv(pod, tmp_path, secrets={})
    root = {**pod, "spec": {**pod["spec"], "securityContext": {"runAsNonRoot": True}}}
    root["spec"]["containers"] = [{**root["spec"]["containers"][0], "securityContext": {}}]
    with pytest.raises(PodConfigError, match="runAsNonRoot"):
        docker_run_argv(root, "trainer", secrets=SECRETS, env_file=tmp_path / "env", volume_root=tmp_path / "vol",
                        name="c", labels={}, hosts=[], image_user="root")
    pvc = {**pod, "spec": {**pod["spec"], "volumes": [*pod["spec"]["volumes"][:-1],
                                                      {"name": "model-cache", "persistentVolumeClaim": {"claimName": "x"}}]}}
    with pytest.raises(PodConfigError, match="persistentVolumeClaim volumes are not supported"):
        _argv(pvc, tmp_path)
