"""Job/Pod status → AttemptState, one case per thing Kubernetes can tell, and the status.json merge."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from kubernetes.client import ApiClient

from service.launchers.k8s.states import attempt_state, latest_pods, merge_status
from service.launchers.base import AttemptState, RunState

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)
_client = ApiClient()


def _model(data: dict[str, Any], kind: str) -> Any:
    # The client's own deserializer, exactly as it builds objects from API responses.
    return _client._ApiClient__deserialize(data, kind)  # type: ignore[attr-defined]


def job(*, conditions: list[dict] | None = None, suspend: bool = False, parallelism: int = 1,
        labels: dict[str, str] | None = None, deleting: bool = False) -> Any:
    meta: dict[str, Any] = {"name": "j-1-a1", "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-23T11:59:00Z"
    return _model({"metadata": meta, "spec": {"suspend": suspend, "parallelism": parallelism, "template": {}},
                   "status": {"conditions": [{"status": "True", **c} for c in conditions or []]}}, "V1Job")


def pod(name: str = "j-1-a1-abcde", *, phase: str = "Pending", index: int | None = None, created_s_ago: int = 10,
        waiting: str | None = None, waiting_message: str = "", terminated: dict | None = None,
        conditions: list[dict] | None = None, reason: str | None = None) -> Any:
    annotations = {"batch.kubernetes.io/job-completion-index": str(index)} if index is not None else {}
    state: dict[str, Any] = {}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": waiting_message}}
    if terminated:
        state = {"terminated": {"finishedAt": "2026-11-23T11:58:00Z", **terminated}}
    if phase == "Running" and not state:
        state = {"running": {"startedAt": "2026-11-23T11:50:00Z"}}
    created = (NOW - dt.timedelta(seconds=created_s_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or [], "reason": reason}
    if state:
        status["containerStatuses"] = [{"name": "trainer", "image": "t", "imageID": "", "ready": False,
                                        "restartCount": 0, "state": state}]
    return _model({"metadata": {"name": name, "annotations": annotations, "creationTimestamp": created},
                   "spec": {"containers": [{"name": "trainer"}]}, "status": status}, "V1Pod")


def state_of(j: Any, pods: list[Any]) -> AttemptState:
    return attempt_state(j, pods, now=NOW, image_pull_timeout_s=600)


def test_no_job_is_gone() -> None:
    assert state_of(None, []).state is RunState.GONE


def test_complete_is_succeeded() -> None:
    assert state_of(job(conditions=[{"type": "Complete"}]), []) == AttemptState(state=RunState.SUCCEEDED, exit_code=0)
    assert state_of(job(conditions=[{"type": "SuccessCriteriaMet"}]), []).state is RunState.SUCCEEDED


def test_suspended_by_kueue_is_queued() -> None:
    s = state_of(job(suspend=True, labels={"kueue.x-k8s.io/queue-name": "lathe-gpu"}), [])
    assert s.state is RunState.PENDING
    assert s.message == "queued: waiting for Kueue to admit it from queue 'lathe-gpu'"


def test_unschedulable_is_pending_with_the_scheduler_message() -> None:
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}
    s = state_of(job(), [pod(conditions=[cond])])
    assert s.state is RunState.PENDING
    assert "unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." in s.message


def test_image_pull_backoff_waits_then_fails() -> None:
    young = pod(waiting="ImagePullBackOff", waiting_message='Back-off pulling image "x"', created_s_ago=60)
    s = state_of(job(), [young])
    assert s.state is RunState.PENDING and "ImagePullBackOff" in s.message and s.reason is None
    old = pod(waiting="ErrImagePull", waiting_message="manifest unknown", created_s_ago=601)
    s = state_of(job(), [old])
    assert (s.state, s.reason) == (RunState.FAILED, "image_pull_error")
    assert "manifest unknown" in s.message and "imagePullSecrets" in s.message


def test_invalid_image_name_fails_at_once() -> None:
    s = state_of(job(), [pod(waiting="InvalidImageName", created_s_ago=1)])
    assert (s.state, s.reason) == (RunState.FAILED, "image_pull_error")


def test_missing_secret_waits_then_fails() -> None:
    missing = 'secret "lathe-s3" not found'
    assert state_of(job(), [pod(waiting="CreateContainerConfigError", waiting_message=missing)]).state is RunState.PENDING
    s = state_of(job(), [pod(waiting="CreateContainerConfigError", waiting_message=missing, created_s_ago=700)])
    assert (s.state, s.reason, s.holds_resources) == (RunState.FAILED, "config_error", True) and missing in s.message


def test_running_needs_every_rank() -> None:
    pods = [pod("p0", phase="Running", index=0), pod("p1", phase="Pending", index=1)]
    s = state_of(job(parallelism=2), pods)
    assert s.state is RunState.PENDING and s.message.startswith("1/2 pods running")
    pods[1] = pod("p1", phase="Running", index=1)
    assert state_of(job(parallelism=2), pods) == AttemptState(state=RunState.RUNNING, message="2/2 pods running")


def test_replaced_pod_hides_the_disrupted_one() -> None:
    evicted = pod("old", phase="Failed", created_s_ago=300, terminated={"exitCode": 20},
                  conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}])
    fresh = pod("new", phase="Running", created_s_ago=30)
    assert [p.metadata.name for p in latest_pods([evicted, fresh])] == ["new"]
    assert state_of(job(), [evicted, fresh]).state is RunState.RUNNING


FAILED = {"type": "Failed", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}


@pytest.mark.parametrize(("terminated", "conditions", "pod_reason", "expected_reason", "expected_code"), [
    ({"exitCode": 137, "reason": "OOMKilled"}, [], None, "oom", 137),
    ({"exitCode": 11, "reason": "Error", "message": "dataset_invalid: no images in 10_cats"}, [], None, "dataset_invalid", 11),
    ({"exitCode": 13, "reason": "Error"}, [], None, "nan_loss", 13),
    ({"exitCode": 21, "reason": "Error"}, [], None, "storage_error", 21),
    ({"exitCode": 1, "reason": "Error"}, [], None, "internal", 1),
    ({"exitCode": 139, "reason": "Error"}, [], None, "internal", 139),  # a crash (SIGSEGV)
    ({"exitCode": 20, "reason": "Error"}, [], None, "preempted", 20),  # the trainer's own SIGTERM exit
    ({"exitCode": 143, "reason": "Error"},
     [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}], None, "preempted", 143),
    (None, [], "Evicted", "preempted", None),  # node-pressure eviction, container never reported
    (None, [], "UnexpectedAdmissionError", "lost", None),
])
def test_failure_reasons(terminated: dict | None, conditions: list, pod_reason: str | None,
                         expected_reason: str, expected_code: int | None) -> None:
    failed_pod = pod(phase="Failed", terminated=terminated, conditions=conditions, reason=pod_reason)
    s = state_of(job(conditions=[FAILED]), [failed_pod])
    assert (s.state, s.reason, s.exit_code) == (RunState.FAILED, expected_reason, expected_code)
    assert "backoff limit" in s.message


def test_trainer_message_reaches_the_state() -> None:
    failed_pod = pod(phase="Failed", terminated={"exitCode": 11, "message": "dataset_invalid: no images in 10_cats"})
    s = state_of(job(conditions=[FAILED]), [failed_pod])
    assert "no images in 10_cats" in s.message


def test_deadline_exceeded() -> None:
    cond = {"type": "Failed", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}
    s = state_of(job(conditions=[cond]), [pod(phase="Failed", terminated={"exitCode": 143})])
    assert (s.state, s.reason) == (RunState.FAILED, "deadline_exceeded")
    assert "max_runtime_s" in s.message


def test_multi_node_root_cause_is_the_most_specific_then_earliest() -> None:
    # Rank 1 ran out of memory; the Job controller then stopped rank 0, which checkpointed (exit 20).
    rank0 = pod("p0", phase="Failed", index=0, terminated={"exitCode": 20, "finishedAt": "2026-11-23T11:58:30Z"})
    rank1 = pod("p1", phase="Failed", index=1, terminated={"exitCode": 137, "reason": "OOMKilled",
                                                           "finishedAt": "2026-11-23T11:58:00Z"})
    s = state_of(job(parallelism=2, conditions=[FAILED]), [rank0, rank1])
    assert (s.reason, s.exit_code) == ("oom", 137) and "pod p1" in s.message
    # Two generic failures: the first one to end is the cause.
    early = pod("p0", phase="Failed", index=0, terminated={"exitCode": 1, "finishedAt": "2026-11-23T11:57:00Z"})
    late = pod("p1", phase="Failed", index=1, terminated={"exitCode": 21, "finishedAt": "2026-11-23T11:58:00Z"})
    assert state_of(job(parallelism=2, conditions=[FAILED]), [late, early]).reason == "internal"


def test_failed_job_without_pods_is_lost() -> None:
    s = state_of(job(conditions=[{"type": "FailureTarget", "reason": "PodFailurePolicy", "message": "m"}]), [])
    assert (s.state, s.reason) == (RunState.FAILED, "lost")


def test_being_deleted_is_said() -> None:
    s = state_of(job(deleting=True), [pod(phase="Running")])
    assert s.state is RunState.RUNNING and "being deleted" in s.message


def test_merge_prefers_trainer_words_but_keeps_kubernetes_reasons() -> None:
    exit_failure = AttemptState(state=RunState.FAILED, reason="internal", exit_code=1, message="pod p: exited 1")
    status = {"phase": "failed", "attempt": 2, "error": {"reason": "storage_error", "message": "PUT s3://b/k: 503"}}
    merged = merge_status(exit_failure, status, attempt=2)
    assert merged == AttemptState(state=RunState.FAILED, reason="storage_error", exit_code=1, message="PUT s3://b/k: 503")
    assert merge_status(exit_failure, status, attempt=3) == exit_failure  # another attempt's status is ignored
    oom = AttemptState(state=RunState.FAILED, reason="oom", exit_code=137, message="OOMKilled")
    assert merge_status(oom, status, attempt=2) == oom
    assert merge_status(exit_failure, None, attempt=2) == exit_failure


def test_merge_reads_the_trainer_status_struct() -> None:
    # What the service's JobStore.read_status hands to the launcher's status_reader.
    from trainer.core.status import ErrorInfo, JobStatus

    status = JobStatus(phase="failed", attempt=1, error=ErrorInfo(reason="model_invalid", message="no UNet in x"))
    exit_failure = AttemptState(state=RunState.FAILED, reason="model_invalid", exit_code=12, message="exited 12")
    merged = merge_status(exit_failure, status, attempt=1)
    assert (merged.reason, merged.message, merged.exit_code) == ("model_invalid", "no UNet in x", 12)


def test_merge_when_the_job_is_gone() -> None:
    gone = AttemptState(state=RunState.GONE)
    assert merge_status(gone, {"phase": "succeeded", "attempt": 1}, 1).state is RunState.SUCCEEDED
    failed = merge_status(gone, {"phase": "failed", "error": {"reason": "nan_loss", "message": "loss is NaN at step 40"}}, 1)
    assert (failed.state, failed.reason, failed.message) == (RunState.FAILED, "nan_loss", "loss is NaN at step 40")
    assert merge_status(gone, {"phase": "training", "attempt": 1}, 1) == gone
    running = AttemptState(state=RunState.RUNNING)
    assert merge_status(running, {"phase": "succeeded"}, 1) == running  # the Job will say Complete soon


def test_evidence_comes_from_the_newest_pod_of_each_rank() -> None:
    # An earlier pod of the same index (OOM) must not outrank the cause of the attempt's end.
    old = pod("old", phase="Failed", created_s_ago=300, terminated={"exitCode": 137, "reason": "OOMKilled"})
    new = pod("new", phase="Failed", created_s_ago=30, terminated={"exitCode": 21, "reason": "Error"})
    s = state_of(job(conditions=[FAILED]), [old, new])
    assert (s.reason, s.exit_code) == ("storage_error", 21) and "pod new" in s.message


def test_failjob_message_is_evidence_when_the_pods_are_gone() -> None:
    exit_rule = {"type": "Failed", "reason": "PodFailurePolicy", "message": (
        "Container trainer for pod lathe/j-1-a1-0-abcde failed with exit code 12 matching FailJob rule at index 0")}
    s = state_of(job(conditions=[exit_rule]), [])
    assert (s.state, s.reason, s.exit_code) == (RunState.FAILED, "model_invalid", 12)
    disrupted = {"type": "Failed", "reason": "PodFailurePolicy", "message": (
        "Pod lathe/j-1-a1-1-fghij has condition DisruptionTarget matching FailJob rule at index 1")}
    assert state_of(job(conditions=[disrupted]), []).reason == "preempted"


def test_failure_target_is_not_final_while_pods_terminate() -> None:
    target = {"type": "FailureTarget", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
    terminating = _model({"metadata": {"name": "p0", "deletionTimestamp": "2026-11-23T11:59:30Z",
                                       "creationTimestamp": "2026-11-23T11:00:00Z"},
                          "spec": {"containers": [{"name": "trainer"}]}, "status": {"phase": "Running"}}, "V1Pod")
    s = state_of(job(conditions=[target]), [terminating])
    assert s.state is RunState.RUNNING and s.message.startswith("stopping: 1 pod(s) still terminating")


def test_storage_eviction_is_its_own_reason() -> None:
    evicted = pod(phase="Failed", reason="Evicted", terminated={"exitCode": 137})
    evicted.status.message = 'Usage of EmptyDir volume "scratch" exceeds the limit "50Gi". '
    s = state_of(job(conditions=[FAILED]), [evicted])
    assert s.reason == "scratch_full" and "LATHE_K8S_SCRATCH_SIZE" in s.message
