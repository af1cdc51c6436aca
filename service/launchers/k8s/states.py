"""Job and Pod status → AttemptState (Lathe's view of one attempt), and the merge with status.json.

Pure functions over the `kubernetes` client's models, so each case is a small table-driven test.
What Kubernetes tells that the trainer cannot: unschedulable and queued pods, image pulls that fail,
OOM kills, evictions and preemptions (DisruptionTarget), the Job's deadline. What only the trainer
knows (its precise error message) comes from status.json when it wrote one.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from kubernetes import client as k8s

from service.launchers.k8s.manifests import ANNOTATION_COMPLETION_INDEX, CONTAINER, LABEL_KUEUE_QUEUE
from service.launchers.base import AttemptState, RunState
from trainer.core.failures import EXIT_CODES, Reason, is_retryable, reason_for_exit

# Waiting reasons that no retry of the kubelet will fix.
_IMAGE_FATAL = {"InvalidImageName", "ErrImageNeverPull"}
# Waiting reasons that may be transient (a registry hiccup) but fail the attempt once they last too long.
_IMAGE_RETRYING = {"ErrImagePull", "ImagePullBackOff"}
_CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# Decided by Kubernetes, so status.json (which the killed trainer could not write) never overrides them.
_KUBERNETES_REASONS = {Reason.OOM, Reason.PREEMPTED, Reason.DEADLINE_EXCEEDED, Reason.IMAGE_PULL_ERROR, Reason.LOST,
                       Reason.SCRATCH_FULL, Reason.UNSCHEDULABLE, Reason.CONFIG_ERROR}
_MESSAGE_MAX = 2000
# A deleted pod still not terminal this long after its grace period ended sits on a node that no longer
# answers (the kubelet alone confirms a deletion): it is lost and holds nothing that can run.
LOST_AFTER_GRACE_S = 60
# The Job controller's FailJob messages (pkg/controller/job/pod_failure_policy.go).
_FAILJOB_EXIT = re.compile(r"for pod [^/]+/(?P<pod>\S+) failed with exit code (?P<code>\d+) matching FailJob rule")
_FAILJOB_CONDITION = re.compile(r"^Pod [^/]+/(?P<pod>\S+) has condition (?P<cond>\w+) matching FailJob rule")


def attempt_state(
    job: k8s.V1Job | None,
    pods: Sequence[k8s.V1Pod],
    *,
    now: dt.datetime,
    image_pull_timeout_s: int,
    start_timeout_s: int | None = None,
) -> AttemptState:
    """Lathe's view of an attempt from its Job and pods (`now` is timezone-aware UTC).

    Final states come only when nothing of the attempt runs any more: `Failed`/`Complete`, or the
    interim `FailureTarget`/`SuccessCriteriaMet` once no pod is left terminating (a pod on a lost node
    does not count). Until then the attempt is RUNNING ("stopping"), so the next one cannot start
    beside it.
    """
    if job is None:
        return AttemptState(state=RunState.GONE, message="no such Job (never created, deleted, or removed by its TTL)")
    conditions = {c.type: c for c in (job.status.conditions if job.status else None) or [] if c.status == "True"}
    current = latest_pods(pods)
    live = [p for p in pods if not _terminal(p) and not _lost(p, now)]
    if "Complete" in conditions:
        return AttemptState(state=RunState.SUCCEEDED, exit_code=0)
    if "Failed" in conditions:
        return _failed(conditions["Failed"], current)
    stopping = _stopping_state(job, conditions, current, live)
    if stopping is not None:
        return stopping
    if job.spec.suspend:
        queue = (job.metadata.labels or {}).get(LABEL_KUEUE_QUEUE)
        where = f"waiting for Kueue to admit it from queue {queue!r}" if queue else "the Job is suspended"
        earlier = f" ({len(live)} pod(s) of an earlier admission still terminating)" if live else ""
        return AttemptState(state=RunState.PENDING, message=f"queued: {where}{earlier}")
    return _pods_state(job, pods, current, now=now, image_pull_timeout_s=image_pull_timeout_s,
                       start_timeout_s=start_timeout_s)


def _stopping_state(job: k8s.V1Job, conditions: dict[str, Any], current: list[k8s.V1Pod],
                    live: list[k8s.V1Pod]) -> AttemptState | None:
    """An attempt whose Job met an interim end condition or is being deleted: RUNNING while pods still
    terminate, then its final state. None for a Job that is neither."""
    target = conditions.get("FailureTarget") or conditions.get("SuccessCriteriaMet")
    deleting = job.metadata.deletion_timestamp is not None
    if target is None and not deleting:
        return None
    if live:
        why = f"{target.type}: {target.message or target.reason}" if target is not None else "the Job is being deleted"
        return AttemptState(state=RunState.RUNNING, message=_clip(
            f"stopping: {len(live)} pod(s) still terminating ({why})"))
    if target is not None and target.type == "SuccessCriteriaMet":
        return AttemptState(state=RunState.SUCCEEDED, exit_code=0)
    if target is not None:
        return _failed(target, current)
    return AttemptState(state=RunState.GONE, message="the Job is being deleted and none of its pods runs")


def _pods_state(job: k8s.V1Job, pods: Sequence[k8s.V1Pod], current: list[k8s.V1Pod], *, now: dt.datetime,
                image_pull_timeout_s: int, start_timeout_s: int | None) -> AttemptState:
    """A Job admitted and not ended, from its pods: stuck, lost, running, or pending (failed once it has
    not started within `start_timeout_s`)."""
    for pod in current:
        stuck = _stuck(pod, now, image_pull_timeout_s)
        if stuck is not None:
            return stuck
    for pod in current:
        if _lost(pod, now):
            return AttemptState(state=RunState.FAILED, reason=Reason.LOST.value, holds_resources=True, message=_clip(
                f"pod {pod.metadata.name} on node {pod.spec.node_name if pod.spec else None!s}: deleted but never "
                f"confirmed by its kubelet; the node is not responding"))
    expected = job.spec.parallelism or 1
    running = [p for p in current if _serving(p)]
    done = [p for p in current if p.status and p.status.phase == "Succeeded"]
    if running and len(running) + len(done) >= expected:
        return AttemptState(state=RunState.RUNNING, message=f"{len(running)}/{expected} pods running")
    message = _pending_message(current, expected)
    started = job.status.start_time if job.status else None
    never_ran = not any(_ran(p) for p in pods)
    if (start_timeout_s is not None and started is not None and never_ran
            and (now - started).total_seconds() > start_timeout_s):
        unschedulable = message.startswith("unschedulable")
        reason = Reason.UNSCHEDULABLE if unschedulable or not current else Reason.LOST
        return AttemptState(state=RunState.FAILED, reason=reason.value, holds_resources=True, message=_clip(
            f"not started {start_timeout_s} s after the Job was admitted: {message}"))
    return AttemptState(state=RunState.PENDING, message=message)


def latest_pods(pods: Sequence[k8s.V1Pod]) -> list[k8s.V1Pod]:
    """The newest pod per completion index: a pod that replaced a disrupted one hides it."""
    newest: dict[str, k8s.V1Pod] = {}
    for pod in pods:
        index = (pod.metadata.annotations or {}).get(ANNOTATION_COMPLETION_INDEX, "0")
        seen = newest.get(index)
        if seen is None or _created(pod) >= _created(seen):
            newest[index] = pod
    return [newest[i] for i in sorted(newest, key=lambda s: int(s) if s.isdigit() else 0)]


def merge_status(state: AttemptState, status: Mapping[str, Any] | msgspec.Struct | None, attempt: int) -> AttemptState:
    """Combine Kubernetes' view with the trainer's status.json of the same attempt.

    `status` is a `trainer.core.status.JobStatus` or its JSON form; used: `phase`, `attempt`, `error`
    ({"reason", "message"}). The trainer's own reason and message are more precise than an exit
    code, but a reason that only Kubernetes can know (oom, preempted, deadline, image pull, lost)
    is kept.
    """
    if isinstance(status, msgspec.Struct):
        status = msgspec.to_builtins(status)
    if not status or status.get("attempt", attempt) != attempt:
        return state
    phase = status.get("phase")
    reason, message = _status_error(status.get("error"))
    if state.state is RunState.FAILED:
        if state.reason is not None and Reason(state.reason) in _KUBERNETES_REASONS:
            return state
        return AttemptState(
            state=RunState.FAILED,
            reason=reason or state.reason,
            message=message or state.message,
            exit_code=state.exit_code,
        )
    if state.state is RunState.GONE:
        # The Job was removed (TTL) after the trainer finished: its own terminal state is what remains.
        if phase == "succeeded":
            return AttemptState(state=RunState.SUCCEEDED, exit_code=0, message="Job gone; status.json says succeeded")
        if phase in ("failed", "cancelled"):
            fallback = Reason.CANCELLED.value if phase == "cancelled" else Reason.INTERNAL.value
            return AttemptState(state=RunState.FAILED, reason=reason or fallback, message=message)
    return state


# ---------------------------------------------------------------------------------------------


def _failed(condition: k8s.V1JobCondition, pods: Sequence[k8s.V1Pod]) -> AttemptState:
    """The cause of a failed attempt: the Job's reason, then the pods (newest per index) as evidence.
    A FailJob message names the pod and its exit code or condition, so it is evidence even after the
    pods were deleted (pods the Job controller or a preemption deleted vanish once they terminate)."""
    job_message = condition.message or condition.reason or "the Job failed"
    if condition.reason == "DeadlineExceeded":
        return AttemptState(state=RunState.FAILED, reason=Reason.DEADLINE_EXCEEDED.value,
                            message=f"ran past resources.max_runtime_s: {job_message}")
    evidence = [e for e in (_pod_failure(p) for p in pods) if e is not None]
    if condition.reason == "PodFailurePolicy":
        named = _FAILJOB_EXIT.search(job_message) or _FAILJOB_CONDITION.search(job_message)
        mine = [e for e in evidence if named and e[5] == named["pod"]]
        if mine:
            evidence = mine
        elif named is not None and "code" in named.groupdict():
            code = int(named["code"])
            reason = reason_for_exit(code) or Reason.INTERNAL
            return AttemptState(state=RunState.FAILED, reason=reason.value, exit_code=code,
                                message=_clip(f"trainer exited {code} ({reason.value}) ({job_message})"))
        elif named is not None and named["cond"] == "DisruptionTarget":
            return AttemptState(state=RunState.FAILED, reason=Reason.PREEMPTED.value,
                                message=_clip(f"preempted or evicted ({job_message})"))
    if not evidence:
        # The pods vanished (node lost, pods garbage-collected): nothing tells why.
        return AttemptState(state=RunState.FAILED, reason=Reason.LOST.value, message=job_message)
    # The root cause is the most specific failure; among equals, the first that happened (the
    # other ranks of a multi-node attempt are then terminated by the Job controller).
    _, _, reason, exit_code, message, _ = min(evidence, key=lambda e: (e[0], e[1]))
    return AttemptState(state=RunState.FAILED, reason=reason.value, exit_code=exit_code,
                        message=_clip(f"{message} ({job_message})"))


def _pod_failure(pod: k8s.V1Pod) -> tuple[int, dt.datetime, Reason, int | None, str, str] | None:
    """(specificity rank, finished at, reason, exit code, message, pod name) for a failed pod, else None."""
    found = _pod_failure_of(pod)
    return None if found is None else (*found, pod.metadata.name)


def _pod_failure_of(pod: k8s.V1Pod) -> tuple[int, dt.datetime, Reason, int | None, str] | None:
    status = pod.status
    if status is None or status.phase != "Failed":
        return None
    name = pod.metadata.name
    terminated = _terminated(pod)
    finished = (terminated.finished_at if terminated and terminated.finished_at else None) or _created(pod)
    disrupted = _disruption(pod)
    if terminated is not None and terminated.reason == "OOMKilled":
        return (0, finished, Reason.OOM, terminated.exit_code,
                f"pod {name}: out of memory (OOMKilled); raise resources.memory or lower the batch size")
    if status.reason == "Evicted" and disrupted is None and _storage_eviction(status.message or ""):
        # The kubelet's local-storage eviction carries no DisruptionTarget: the pod's own fault, and
        # it would overflow again on the next attempt.
        return (0, finished, Reason.SCRATCH_FULL, terminated.exit_code if terminated else None,
                f"pod {name}: evicted by the kubelet: {(status.message or '').strip()}; "
                "raise the scratch size (LATHE_K8S_SCRATCH_SIZE) or lower the dataset / cache size")
    code = terminated.exit_code if terminated is not None else None
    reason = reason_for_exit(code)
    detail = (terminated.message or "").strip() if terminated is not None else ""
    if reason is not None and not is_retryable(reason):
        return (1, finished, reason, code, f"pod {name}: trainer exited {code} ({reason.value}){_tail(detail)}")
    if disrupted is not None or code == EXIT_CODES[Reason.PREEMPTED]:
        why = disrupted or "SIGTERM, checkpoint saved"
        return (2, finished, Reason.PREEMPTED, code, f"pod {name}: preempted or evicted ({why})")
    if code is None:
        why = status.message or status.reason or "no container status"
        return (3, finished, Reason.LOST, None, f"pod {name}: failed without an exit code ({why})")
    return (3, finished, reason or Reason.INTERNAL, code,
            f"pod {name}: trainer exited {code} ({(reason or Reason.INTERNAL).value}){_tail(detail)}")


def _disruption(pod: k8s.V1Pod) -> str | None:
    for c in pod.status.conditions or []:
        if c.type == "DisruptionTarget" and c.status == "True":
            return c.reason or "DisruptionTarget"
    if pod.status.reason in ("Preempting", "Terminated", "NodeShutdown"):
        return pod.status.reason  # graceful node shutdown on kubelets older than DisruptionTarget
    if pod.status.reason == "Evicted" and not _storage_eviction(pod.status.message or ""):
        return pod.status.reason  # node-pressure eviction on kubelets older than DisruptionTarget
    return None


def _storage_eviction(message: str) -> bool:
    return "EmptyDir volume" in message or "ephemeral" in message.lower() and "exceeds" in message


def _stuck(pod: k8s.V1Pod, now: dt.datetime, timeout_s: int) -> AttemptState | None:
    """An attempt whose pod cannot start: image problems, bad config (missing Secret…)."""
    for cs in (pod.status.container_statuses if pod.status else None) or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is None or not waiting.reason:
            continue
        what = f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
        age = (now - _created(pod)).total_seconds()
        if waiting.reason in _IMAGE_FATAL or (waiting.reason in _IMAGE_RETRYING and age > timeout_s):
            return AttemptState(state=RunState.FAILED, reason=Reason.IMAGE_PULL_ERROR.value, holds_resources=True,
                                message=_clip(f"{what}; check the trainer image name and imagePullSecrets"))
        if waiting.reason in _CONFIG_ERRORS and age > timeout_s:
            return AttemptState(state=RunState.FAILED, reason=Reason.CONFIG_ERROR.value, holds_resources=True,
                                message=_clip(f"{what}; check the Secrets and volumes the trainer pod uses"))
        if waiting.reason in _IMAGE_RETRYING | _CONFIG_ERRORS:
            return AttemptState(state=RunState.PENDING, message=_clip(f"{what} (retrying for up to {timeout_s}s)"))
    return None


def _terminal(pod: k8s.V1Pod) -> bool:
    return bool(pod.status and pod.status.phase in ("Succeeded", "Failed"))


def _lost(pod: k8s.V1Pod, now: dt.datetime) -> bool:
    """Deleted, not terminal, and its grace period long over: the kubelet that should confirm is gone."""
    gone_at = pod.metadata.deletion_timestamp
    return gone_at is not None and not _terminal(pod) and (now - gone_at).total_seconds() > LOST_AFTER_GRACE_S


def _ran(pod: k8s.V1Pod) -> bool:
    """A container of the pod started at some point (it was scheduled, pulled and configured)."""
    return any(cs.state is not None and (cs.state.running is not None or cs.state.terminated is not None)
               for cs in (pod.status.container_statuses if pod.status else None) or [])


def _serving(pod: k8s.V1Pod) -> bool:
    """Running, not being deleted, and not marked NotReady (the node lifecycle controller marks the
    pods of a node that stopped answering)."""
    if not pod.status or pod.status.phase != "Running" or pod.metadata.deletion_timestamp is not None:
        return False
    return not any(c.type == "Ready" and c.status == "False" for c in pod.status.conditions or [])


def _pending_message(pods: Sequence[k8s.V1Pod], expected: int) -> str:
    if not pods:
        return ("waiting for the Job controller to create pods (if this lasts, `kubectl describe job` shows "
                "FailedCreate events: an admission webhook, ResourceQuota or LimitRange refused them)")
    for pod in pods:
        for c in (pod.status.conditions if pod.status else None) or []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                return _clip(f"unschedulable: {c.message or 'no node fits'} (pod {pod.metadata.name})")
    running = sum(1 for p in pods if _serving(p))
    not_ready = [p.metadata.name for p in pods if p.status and p.status.phase == "Running" and not _serving(p)]
    extra = f" ({', '.join(not_ready)} not ready or terminating: node not responding?)" if not_ready else ""
    return f"{running}/{expected} pods running; waiting for the others to start{extra}"


def _terminated(pod: k8s.V1Pod) -> k8s.V1ContainerStateTerminated | None:
    for cs in pod.status.container_statuses or []:
        if cs.name == CONTAINER and cs.state and cs.state.terminated:
            return cs.state.terminated
    return None


def _status_error(error: Any) -> tuple[str | None, str | None]:
    if isinstance(error, Mapping):
        reason = error.get("reason")
        valid = reason in {r.value for r in Reason}
        return (reason if valid else None), error.get("message")
    if isinstance(error, str) and error:
        return None, error
    return None, None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _created(pod: k8s.V1Pod) -> dt.datetime:
    return pod.metadata.creation_timestamp or _EPOCH


def _tail(detail: str) -> str:
    return f": {detail[-500:]}" if detail else ""


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_MAX else text[: _MESSAGE_MAX - 1] + "…"
