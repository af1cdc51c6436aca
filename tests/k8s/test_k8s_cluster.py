"""What the launcher reports when the stand-in cluster behaves as a real one does.

Each case runs the real Job controller model (controllers.py) and a kubelet (kubelet.py) with scripted
trainer processes; nothing writes a Job or pod status by hand. The states are what `states.py` must
read from them: success, final exit codes, OOM, preemption at one and two nodes, storage eviction,
deadline, image and config errors, unschedulable pods, refused pod creation, a lost node.
"""

from __future__ import annotations

import pytest
from fake_apiserver import FakeApiServer
from k8s_helpers import JOB_ID, full_settings, gpu_node, make_request
from kubelet import Script, SimulatedRuntime
from kubernetes import client as k8s

from service.launchers.k8s.launcher import KubernetesApiError, KubernetesLauncher
from service.launchers.base import RunState

NAME = f"{JOB_ID}-a1"


def _launcher(api: FakeApiServer, **settings: object) -> KubernetesLauncher:
    return KubernetesLauncher(full_settings(**settings), k8s.ApiClient(k8s.Configuration(host=api.url)),
                              sleep=lambda s: None, request_timeout_s=10, now=api.now)


def _conditions(api: FakeApiServer, name: str = NAME) -> list[tuple[str, str]]:
    return [(c["type"], c["reason"]) for c in api.get("jobs", "lathe", name)["status"].get("conditions", [])]


@pytest.mark.parametrize(("gpus", "nodes"), [(1, 1), (8, 1), (2, 2)])
def test_final_exit_code_fails_the_job_with_that_reason(api: FakeApiServer, gpus: int, nodes: int) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": gpus, "nodes": nodes}))
    runtime = SimulatedRuntime(Script(steps=None), scripts={nodes - 1: Script(exit_code=11, steps=2)})
    gpu_node(api, runtime, capacity={"nvidia.com/gpu": 16}).run_until_settled()
    assert _conditions(api)[-1] == ("Failed", "PodFailurePolicy")
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason, s.exit_code) == (RunState.FAILED, "dataset_invalid", 11)
    # The failed pod stays (for its log); the other ranks were deleted and are gone.
    assert [p["status"]["phase"] for p in api.pods_of("lathe", NAME)] == ["Failed"]


def test_success_is_final_only_when_complete(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    gpu_node(api, SimulatedRuntime(Script(steps=1))).run_until_settled()
    assert _conditions(api) == [("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "CompletionsReached")]
    assert launcher.state("acme", JOB_ID, 1).state is RunState.SUCCEEDED


def test_single_node_preemption_fails_the_job_and_replaces_nothing(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, SimulatedRuntime(Script(steps=None)))
    node.run_until_settled(2)
    (pod,) = api.pods_of("lathe", NAME)
    api.preempt("lathe", pod["metadata"]["name"])
    node.run_until_settled()
    assert len(node.runtime.started) == 1  # the Job did not start a second trainer
    assert _conditions(api)[-1] == ("Failed", "PodFailurePolicy")
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason) == (RunState.FAILED, "preempted")


def test_multi_node_preemption_is_preempted_and_final_only_when_every_rank_stopped(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 2, "nodes": 2}))
    # Rank 0 ignores SIGTERM for a while (a checkpoint takes time): it is still terminating.
    runtime = SimulatedRuntime(Script(steps=None), scripts={0: Script(steps=None, on_sigterm=None)})
    node = gpu_node(api, runtime)
    node.run_until_settled(2)
    rank1 = next(p for p in api.pods_of("lathe", NAME) if p["spec"]["hostname"].endswith("-1"))
    api.preempt("lathe", rank1["metadata"]["name"])
    node.run_until_settled(3)
    assert ("FailureTarget", "PodFailurePolicy") in _conditions(api)
    s = launcher.state("acme", JOB_ID, 1)
    assert s.state is RunState.RUNNING and s.message.startswith("stopping: 1 pod(s) still terminating")
    api.advance(600 + 1)  # the grace period ends: rank 0 is SIGKILLed
    node.run_until_settled(3)
    assert _conditions(api)[-1] == ("Failed", "PodFailurePolicy")
    assert api.pods_of("lathe", NAME) == []  # deleted pods vanish once terminated
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason) == (RunState.FAILED, "preempted")


def test_oom_kill_is_oom(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    gpu_node(api, SimulatedRuntime(Script(oom=True))).run_until_settled()
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason, s.exit_code) == (RunState.FAILED, "oom", 137)


def test_storage_eviction_is_not_a_disruption(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, SimulatedRuntime(Script(steps=None)))
    node.run_until_settled(2)
    (pod,) = api.pods_of("lathe", NAME)
    node.evict_for_storage("lathe", pod["metadata"]["name"], "scratch")
    node.run_until_settled()
    (pod,) = api.pods_of("lathe", NAME)
    assert pod["status"]["reason"] == "Evicted"
    assert not any(c["type"] == "DisruptionTarget" for c in pod["status"]["conditions"])
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason) == (RunState.FAILED, "scratch_full")  # not retried as a preemption
    assert 'EmptyDir volume "scratch" exceeds the limit "50Gi"' in s.message


def test_node_pressure_eviction_is_a_disruption(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, SimulatedRuntime(Script(steps=None)))
    node.run_until_settled(2)
    (pod,) = api.pods_of("lathe", NAME)
    node.evict_for_pressure("lathe", pod["metadata"]["name"])
    node.run_until_settled()
    assert launcher.state("acme", JOB_ID, 1).reason == "preempted"


def test_deadline_counts_from_the_start_and_resets_on_resume(api: FakeApiServer) -> None:
    launcher = _launcher(api, kueue_queue="lathe-gpu")
    launcher.submit(make_request({"gpus": 1, "max_runtime_s": 600}))
    node = gpu_node(api, SimulatedRuntime(Script(steps=None)))
    api.advance(3600)  # an hour in the queue does not count
    node.run_until_settled(2)
    assert launcher.state("acme", JOB_ID, 1).message.startswith("queued: waiting for Kueue")
    api.admit("lathe", NAME)
    node.run_until_settled(2)
    api.advance(500)
    api.kueue_preempt("lathe", NAME)  # suspended: pods deleted, not counted as failures
    node.run_until_settled(3)
    assert _conditions(api) == [("Suspended", "JobSuspended")]
    api.admit("lathe", NAME)
    node.run_until_settled(2)
    api.advance(500)  # 1000 s since the first start, 500 s since the resume
    node.run_until_settled(2)
    assert launcher.state("acme", JOB_ID, 1).state is RunState.RUNNING
    api.advance(101)
    node.run_until_settled(3)
    assert _conditions(api)[-2:] == [("FailureTarget", "DeadlineExceeded"), ("Failed", "DeadlineExceeded")]
    assert launcher.state("acme", JOB_ID, 1).reason == "deadline_exceeded"


@pytest.mark.parametrize(("runtime", "secrets", "reason"), [
    (SimulatedRuntime(bad_images={"registry.example.com/lathe/trainer:0.1.0": ("InvalidImageName", "bad")}),
     None, "image_pull_error"),
    (SimulatedRuntime(), {}, "config_error"),
])
def test_a_pod_that_cannot_start_fails_and_still_holds_its_gpu(api: FakeApiServer, runtime: SimulatedRuntime,
                                                                secrets: dict | None, reason: str) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, runtime, **({"secrets": secrets} if secrets is not None else {}))
    node.run_until_settled(3)
    api.advance(601)  # image_pull_timeout_s
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason, s.holds_resources) == (RunState.FAILED, reason, True)
    assert len(api.pods_of("lathe", NAME)) == 1  # the Job does not fail by itself: the service must cancel
    launcher.cancel("acme", JOB_ID, 1)
    node.run_until_settled(3)
    assert api.names("jobs", "lathe") == api.names("pods", "lathe") == []


def test_unschedulable_pod_fails_after_the_start_timeout(api: FakeApiServer) -> None:
    launcher = _launcher(api, start_timeout_s=1800)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, SimulatedRuntime(), capacity={"nvidia.com/gpu": 0})
    node.run_until_settled(2)
    s = launcher.state("acme", JOB_ID, 1)
    assert s.state is RunState.PENDING and "Insufficient nvidia.com/gpu" in s.message
    api.advance(1801)
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason, s.holds_resources) == (RunState.FAILED, "unschedulable", True)
    assert "Insufficient nvidia.com/gpu" in s.message


def test_refused_pod_creation_fails_after_the_start_timeout(api: FakeApiServer) -> None:
    launcher = _launcher(api, start_timeout_s=1800)
    api.refuse_pods = 'admission webhook "policy.example.com" denied the request'
    launcher.submit(make_request({"gpus": 1}))
    api.sync_jobs()
    assert api.pods_of("lathe", NAME) == [] and api.events[0]["reason"] == "FailedCreate"
    assert _conditions(api) == []  # only an Event says why: the Job has no condition
    assert launcher.state("acme", JOB_ID, 1).state is RunState.PENDING
    api.advance(1801)
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason) == (RunState.FAILED, "unschedulable") and "FailedCreate" in s.message


def test_lost_node_pod_is_not_running_and_ends_as_lost(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, SimulatedRuntime(Script(steps=None)))
    node.run_until_settled(2)
    assert launcher.state("acme", JOB_ID, 1).state is RunState.RUNNING
    node.lose()
    (pod,) = api.pods_of("lathe", NAME)
    assert launcher.state("acme", JOB_ID, 1).state is RunState.PENDING  # NotReady is not running
    api.advance(300)
    api.taint_evict("lathe", pod["metadata"]["name"])  # NoExecute unreachable taint, 300 s toleration
    node.run_until_settled(3)
    assert _conditions(api) == []  # only Failed pods count: the Job waits for the pod forever
    s = launcher.state("acme", JOB_ID, 1)  # within the grace period: not running, not over
    assert s.state is RunState.PENDING and "not ready or terminating" in s.message
    api.advance(3600)  # past the start timeout too: the pod did run, so that is not the verdict
    s = launcher.state("acme", JOB_ID, 1)
    assert (s.state, s.reason, s.holds_resources) == (RunState.FAILED, "lost", True)
    launcher.cancel("acme", JOB_ID, 1)
    node.run_until_settled(2)
    # The pod stays Terminating (no kubelet confirms), but the attempt no longer counts as running.
    assert launcher.state("acme", JOB_ID, 1).state is RunState.GONE


def test_ttl_deletes_the_finished_job_and_its_pods(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    launcher.submit(make_request({"gpus": 1}))
    node = gpu_node(api, SimulatedRuntime(Script(exit_code=11)))
    node.run_until_settled()
    api.advance(86_400)
    node.run_until_settled(2)
    assert api.names("jobs", "lathe") == api.names("pods", "lathe") == []
    assert launcher.state("acme", JOB_ID, 1).state is RunState.GONE


def test_a_failed_service_create_leaves_no_job(api: FakeApiServer) -> None:
    launcher = _launcher(api)
    api.fail_next("POST", r"/services$", 403)
    with pytest.raises(KubernetesApiError, match="create Service"):
        launcher.submit(make_request({"gpus": 2, "nodes": 2}))
    api.sync_jobs()
    assert api.names("jobs", "lathe") == [] and api.names("pods", "lathe") == []


def test_job_status_needs_the_interim_conditions(api: FakeApiServer) -> None:
    _launcher(api).submit(make_request())
    with pytest.raises(ValueError, match="without the FailureTarget=True condition"):
        api.set_status("jobs", "lathe", NAME, {"conditions": [{"type": "Failed", "status": "True"}]})
