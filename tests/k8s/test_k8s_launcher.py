"""KubernetesLauncher through the real `kubernetes` client against the stand-in API server on 127.0.0.1."""

from __future__ import annotations

import datetime as dt

import pytest
from fake_apiserver import FakeApiServer
from k8s_helpers import JOB_ID, full_settings, gpu_node, make_request
from kubelet import Script, SimulatedRuntime
from kubernetes import client as k8s

from service.launchers.k8s.launcher import KubernetesApiError, KubernetesLauncher
from service.launchers.base import AttemptState, Launcher, RunState

NAME = f"{JOB_ID}-a1"


def _launcher(api: FakeApiServer, **kwargs) -> KubernetesLauncher:  # noqa: ANN003
    return KubernetesLauncher(kwargs.pop("settings", full_settings()), k8s.ApiClient(k8s.Configuration(host=api.url)),
                              sleep=lambda s: None, request_timeout_s=10, **kwargs)


def test_is_a_launcher(launcher: KubernetesLauncher) -> None:
    assert isinstance(launcher, Launcher)


def test_submit_creates_the_job_and_is_idempotent(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    request = make_request({"gpus": 1})
    launcher.submit(request)
    launcher.submit(request)  # 409 ⇒ the existing Job is fetched and accepted
    assert api.names("jobs", "lathe") == [NAME]
    assert api.names("services", "lathe") == []  # single node: no rendezvous Service
    assert [m for m, _ in api.requests] == ["POST", "POST", "GET"]
    stored = api.get("jobs", "lathe", NAME)
    assert stored["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["python", "-m", "trainer"]
    s = launcher.state("acme", JOB_ID, 1)
    assert s.state is RunState.PENDING and s.message.startswith("waiting for the Job controller to create pods")


def test_submit_refuses_a_name_taken_by_another_tenant(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    launcher.submit(make_request(tenant="globex"))
    with pytest.raises(KubernetesApiError, match=f"create Job lathe/{NAME}: 409 .*another job or tenant"):
        launcher.submit(make_request(tenant="acme"))
    # and one tenant never sees the other's attempt
    assert launcher.state("acme", JOB_ID, 1).state is RunState.GONE


def test_multi_node_submit_creates_an_owned_headless_service(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    request = make_request({"gpus": 8, "nodes": 4})
    launcher.submit(request)
    launcher.submit(request)
    job, service = api.get("jobs", "lathe", NAME), api.get("services", "lathe", NAME)
    assert job["spec"]["completionMode"] == "Indexed"
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": NAME, "uid": job["metadata"]["uid"]}]


def test_lifecycle_running_logs_succeeded(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    launcher.submit(make_request({"gpus": 1}))
    api.sync_jobs()
    assert launcher.state("acme", JOB_ID, 1).state is RunState.PENDING
    assert launcher.logs("acme", JOB_ID, 1).startswith("[no log yet: container \"trainer\"")
    node = gpu_node(api, SimulatedRuntime(Script(steps=2, log="".join(f"step {i}\n" for i in range(1, 501)))))
    node.step()  # scheduled
    node.step()  # started
    assert launcher.state("acme", JOB_ID, 1) == AttemptState(state=RunState.RUNNING, message="1/1 pods running")
    node.step()
    assert launcher.logs("acme", JOB_ID, 1, tail_lines=3) == "step 498\nstep 499\nstep 500\n"
    node.run_until_settled()
    conditions = [c["type"] for c in api.get("jobs", "lathe", NAME)["status"]["conditions"]]
    assert conditions == ["SuccessCriteriaMet", "Complete"]
    assert launcher.state("acme", JOB_ID, 1).state is RunState.SUCCEEDED


def test_multi_node_logs_name_each_rank(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    launcher.submit(make_request({"gpus": 2, "nodes": 2}))
    api.sync_jobs()
    running = {"phase": "Running", "containerStatuses": [{"name": "trainer", "image": "t", "imageID": "",
                                                          "ready": True, "restartCount": 0, "state": {"running": {}}}]}
    for pod in api.pods_of("lathe", NAME):
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        api.set_status("pods", "lathe", pod["metadata"]["name"], running)
        api.set_log("lathe", pod["metadata"]["name"], f"rank {index} ready\n")
    text = launcher.logs("acme", JOB_ID, 1)
    assert text.count("==> pod ") == 2
    assert text.index("(rank 0) <==\nrank 0 ready") < text.index("(rank 1) <==\nrank 1 ready")
    assert launcher.state("acme", JOB_ID, 1).state is RunState.RUNNING


def test_failure_read_from_pods(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    launcher.submit(make_request({"gpus": 1}))
    gpu_node(api, SimulatedRuntime(Script(oom=True, steps=1))).run_until_settled()
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason, s.exit_code) == (RunState.FAILED, "oom", 137)


def test_status_json_is_merged(api: FakeApiServer) -> None:
    reads: list[tuple[str, str]] = []

    def status_reader(tenant: str, job_id: str) -> dict:
        reads.append((tenant, job_id))
        return {"phase": "failed", "attempt": 1, "error": {"reason": "dataset_invalid", "message": "10_cats: no images"}}

    launcher = _launcher(api, status_reader=status_reader)
    launcher.submit(make_request())
    gpu_node(api, SimulatedRuntime(Script(exit_code=11))).run_until_settled()
    job = api.get("jobs", "lathe", NAME)
    assert [c["reason"] for c in job["status"]["conditions"]] == ["PodFailurePolicy", "PodFailurePolicy"]
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.reason, s.message, s.exit_code) == ("dataset_invalid", "10_cats: no images", 11)
    assert reads == [("acme", JOB_ID)]


def test_image_pull_timeout_uses_the_injected_clock(api: FakeApiServer) -> None:
    clock = [dt.datetime(2026, 11, 23, 10, 0, 0, tzinfo=dt.timezone.utc)]
    api.now = lambda: clock[0]
    launcher = _launcher(api, now=lambda: clock[0])
    launcher.submit(make_request())
    api.sync_jobs()
    (pod,) = api.pods_of("lathe", NAME)
    api.set_status("pods", "lathe", pod["metadata"]["name"], {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "image": "t", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}]})
    assert launcher.state("acme", JOB_ID, 1).state is RunState.PENDING
    clock[0] += dt.timedelta(seconds=601)
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason) == (RunState.FAILED, "image_pull_error")


def test_kueue_job_is_queued_until_admitted(api: FakeApiServer) -> None:
    launcher = _launcher(api, settings=full_settings(kueue_queue="lathe-gpu"))
    launcher.submit(make_request({"gpus": 8}))
    api.sync_jobs()
    assert api.pods_of("lathe", NAME) == []  # suspended: no pods
    assert launcher.state("acme", JOB_ID, 1).message == "queued: waiting for Kueue to admit it from queue 'lathe-gpu'"
    api.admit("lathe", NAME)
    api.sync_jobs()
    assert len(api.pods_of("lathe", NAME)) == 1


def test_cancel_deletes_in_the_foreground(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    launcher.submit(make_request({"gpus": 2, "nodes": 2}))
    api.sync_jobs()
    launcher.cancel("acme", JOB_ID, 1)
    delete = [p for m, p in api.requests if m == "DELETE"]
    assert [p.split("?")[0].rsplit("/", 2)[-2] for p in delete] == ["jobs", "services"]
    # Foreground: the Job stays while its pods terminate (SIGTERM → checkpoint), so no GONE too early.
    job = api.get("jobs", "lathe", NAME)
    assert job["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert all(p["metadata"].get("deletionTimestamp") for p in api.pods_of("lathe", NAME))
    assert "being deleted" in launcher.state("acme", JOB_ID, 1).message
    api.finish_terminations()
    assert api.names("jobs", "lathe") == api.names("pods", "lathe") == api.names("services", "lathe") == []
    assert launcher.state("acme", JOB_ID, 1).state is RunState.GONE
    launcher.cancel("acme", JOB_ID, 1)  # idempotent: nothing left, no error


def test_cancel_leaves_another_tenants_job(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    launcher.submit(make_request(tenant="globex"))
    with pytest.raises(KubernetesApiError, match="belongs to another tenant"):
        launcher.cancel("acme", JOB_ID, 1)
    assert api.names("jobs", "lathe") == [NAME]


def test_retries_5xx_a_bounded_number_of_times(api: FakeApiServer, sleeps: list[float],
                                               launcher: KubernetesLauncher) -> None:
    api.fail_next("POST", r"/jobs$", 503, times=2)
    api.fail_next("GET", r"/pods$", 500, times=1)
    launcher.submit(make_request())
    assert launcher.state("acme", JOB_ID, 1).state is RunState.PENDING
    assert api.names("jobs", "lathe") == [NAME]
    assert sleeps == [0.5, 1.0, 0.5]  # exponential backoff from the injected sleeper

    api.fail_next("GET", r"/jobs/", 504, times=10)
    before = len(api.requests)
    with pytest.raises(KubernetesApiError, match=f"read Job lathe/{NAME}: 504 injected fault"):
        launcher.state("acme", JOB_ID, 1)
    assert len(api.requests) - before == 4  # 1 + 3 retries, then the error
    assert sleeps[3:] == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 429, 502])
def test_other_errors_are_not_retried(api: FakeApiServer, sleeps: list[float], launcher: KubernetesLauncher,
                                      status: int) -> None:
    api.fail_next("POST", r"/jobs$", status, times=5)
    with pytest.raises(KubernetesApiError) as info:
        launcher.submit(make_request())
    assert info.value.status == status
    assert sleeps == []
    assert f"create Job lathe/{NAME}: {status}" in str(info.value)


def test_rbac_denial_names_the_fix(api: FakeApiServer, launcher: KubernetesLauncher) -> None:
    api.forbid("create", "jobs")
    with pytest.raises(KubernetesApiError, match=r'cannot create resource "jobs".*see the Role in helm/lathe'):
        launcher.submit(make_request())


def test_unknown_namespace_is_a_clear_error(api: FakeApiServer) -> None:
    launcher = _launcher(api, settings=full_settings(namespace="elsewhere"))
    with pytest.raises(KubernetesApiError, match='create Job elsewhere/.*404 namespaces "elsewhere" not found'):
        launcher.submit(make_request())


def test_api_server_rejects_an_invalid_job(api: FakeApiServer) -> None:
    # Kubernetes refuses a size that is not a quantity; the stand-in must as well.
    launcher = _launcher(api, settings=full_settings(scratch_size="lots"))
    with pytest.raises(KubernetesApiError, match="422 .*is invalid"):
        launcher.submit(make_request())


def test_connection_refused_is_a_clear_error() -> None:
    with FakeApiServer() as api:
        url = api.url
    launcher = KubernetesLauncher(full_settings(), k8s.ApiClient(k8s.Configuration(host=url)),
                                  sleep=lambda s: None, request_timeout_s=2)
    launcher._batch.api_client.rest_client.pool_manager.connection_pool_kw["retries"] = 0
    with pytest.raises(KubernetesApiError, match="read Job lathe/.*no response"):
        launcher.state("acme", JOB_ID, 1)
