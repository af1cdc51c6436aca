"""The controllers of the stand-in cluster: the Job controller, the disruption controllers, Kueue.

Modelled on kube-controller-manager as of Kubernetes 1.33 (feature gates at their defaults there:
JobPodReplacementPolicy and JobManagedBy on, so terminal conditions are delayed; PodDisruptionConditions
on). What each function follows in the real sources (github.com/kubernetes/kubernetes):
- `sync_job`: `syncJob` and `trackJobStatusAndRemoveFinalizers` in pkg/controller/job/job_controller.go:
  failed = status.failed + newly failed pods that no `Ignore` rule matched; a `FailJob` rule, then
  `failed > backoffLimit`, then `activeDeadlineSeconds` (counted from `status.startTime`, which is reset
  when the Job resumes) yield the interim `FailureTarget` condition (reasons PodFailurePolicy,
  BackoffLimitExceeded, DeadlineExceeded, with the real messages); the active pods are then deleted and
  `Failed` follows only once no pod is terminating. Success: `SuccessCriteriaMet`, then `Complete`.
- `is_pod_failed` / `only_replace_failed`: `isPodFailed`, `onlyReplaceFailedPods` there; the default of
  `podReplacementPolicy` (Failed when a podFailurePolicy is set, else TerminatingOrFailed) is from
  pkg/apis/batch/v1/defaults.go.
- `match_pod_failure_policy`: pkg/controller/job/pod_failure_policy.go (rules in order, first match wins,
  `onExitCodes` skips exit code 0 and honours `containerName`).
- pod creation: `manageJob` (replacements wait for terminating pods when only failed pods are replaced,
  the pod-failure back-off of 10 s doubling to 6 min from backoff_utils.go, Indexed pods get the
  completion-index annotation and label, hostname `<job>-<index>` and `JOB_COMPLETION_INDEX` from
  indexed_job_utils.go); the `batch.kubernetes.io/job-tracking` finalizer on every pod.
- suspend: `manageJob` deletes the active pods after removing their finalizers (not counted as failed)
  and sets `Suspended`; resuming sets it False ("JobResumed") and resets `startTime`.
- TTL: pkg/controller/ttlafterfinished deletes a finished Job `ttlSecondsAfterFinished` after its
  terminal condition, with Foreground propagation.
- disruptions: the DisruptionTarget reasons of pkg/controller/podgc, pkg/controller/tainteviction and
  the scheduler's preemption (PreemptionByScheduler), the Eviction API (EvictionByEvictionAPI).
- Kueue (sigs.k8s.io/kueue pkg/controller/jobframework/reconciler.go): admission unsuspends the Job and
  merges the flavor's nodeSelector/tolerations into the template; preemption (eviction of the workload)
  suspends it again and restores the template; the workload is requeued and admitted again later.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fake_apiserver import FakeApiServer

TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
BACKOFF_BASE_S, BACKOFF_MAX_S = 10.0, 360.0  # DefaultJobPodFailureBackOff, MaxJobPodFailureBackOff


def parse_ts(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def ts(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_terminal(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def only_replace_failed(job: dict[str, Any]) -> bool:
    return job["spec"].get("podReplacementPolicy") == "Failed" or bool(job["spec"].get("podFailurePolicy"))


def is_pod_failed(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    phase = pod.get("status", {}).get("phase")
    if phase == "Failed":
        return True
    if only_replace_failed(job):
        return False
    return bool(pod["metadata"].get("deletionTimestamp")) and phase != "Succeeded"


def match_pod_failure_policy(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str | None, bool, str | None]:
    """(FailJob message, counts towards backoffLimit, matched action)."""
    if not policy:
        return None, True, None
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    status = pod.get("status", {})
    for index, rule in enumerate(policy.get("rules", [])):
        action = rule["action"]
        if rule.get("onExitCodes"):
            req = rule["onExitCodes"]
            for cs in status.get("containerStatuses", []) + status.get("initContainerStatuses", []):
                term = cs.get("state", {}).get("terminated")
                if term is None or term.get("exitCode", 0) == 0:
                    continue
                if req.get("containerName") not in (None, cs["name"]):
                    continue
                inside = term["exitCode"] in req.get("values", [])
                if inside == (req["operator"] == "In"):
                    msg = (f"Container {cs['name']} for pod {ns}/{name} failed with exit code {term['exitCode']} "
                           f"matching {action} rule at index {index}")
                    return (msg if action == "FailJob" else None), action != "Ignore", action
        else:
            for cond in status.get("conditions", []):
                if any(cond["type"] == p["type"] and cond["status"] == p.get("status", "True")
                       for p in rule.get("onPodConditions", [])):
                    msg = f"Pod {ns}/{name} has condition {cond['type']} matching {action} rule at index {index}"
                    return (msg if action == "FailJob" else None), action != "Ignore", action
    return None, True, None


def _condition(job: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in job.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def is_finished(job: dict[str, Any]) -> bool:
    return any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
               for c in job.get("status", {}).get("conditions", []))


def _set_condition(job: dict[str, Any], ctype: str, status: str, reason: str, message: str, now: dt.datetime) -> bool:
    conds = job.setdefault("status", {}).setdefault("conditions", [])
    new = {"type": ctype, "status": status, "reason": reason, "message": message,
           "lastProbeTime": ts(now), "lastTransitionTime": ts(now)}
    old = _condition(job, ctype)
    if old is not None:
        if (old["status"], old.get("reason"), old.get("message")) != (status, reason, message):
            old.update(new)
            return True
        return False
    if status != "False":
        conds.append(new)
        return True
    return False


def _index(pod: dict[str, Any]) -> int | None:
    value = pod["metadata"].get("annotations", {}).get(INDEX_ANNOTATION)
    return int(value) if value is not None and value.isdigit() else None


class JobController:
    """One `sync()` = one pass of the Job controller (and the TTL controller) over every Job."""

    def __init__(self, api: FakeApiServer) -> None:
        self.api = api
        self._backoff: dict[str, tuple[int, dt.datetime]] = {}  # job uid → (failures since success, last)

    def sync(self) -> None:
        for (resource, ns, _), job in list(self.api.objects.items()):
            if resource == "jobs" and job in self.api.objects.values():
                self.sync_job(ns, job)
        self._release_orphans()

    def _pods(self, ns: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        uid = job["metadata"]["uid"]
        return [o for (r, s, _), o in sorted(self.api.objects.items()) if r == "pods" and s == ns and any(
            ref.get("uid") == uid and ref.get("controller") for ref in o["metadata"].get("ownerReferences", []))]

    def _release_orphans(self) -> None:
        """Pods whose Job is gone keep no tracking finalizer (the controller's orphan handling)."""
        uids = {o["metadata"]["uid"] for (r, _, _), o in self.api.objects.items() if r == "jobs"}
        for (r, _, _), pod in list(self.api.objects.items()):
            if r == "pods" and not any(ref.get("uid") in uids for ref in pod["metadata"].get("ownerReferences", [])):
                _drop_finalizer(pod)

    def sync_job(self, ns: str, job: dict[str, Any]) -> None:
        api, now = self.api, self.api.now()
        spec, status = job["spec"], job.setdefault("status", {})
        pods = self._pods(ns, job)
        if is_finished(job) or job["metadata"].get("deletionTimestamp"):
            for pod in pods:
                _drop_finalizer(pod)
            self._ttl(ns, job, now)
            return
        suspended = bool(spec.get("suspend"))
        policy = spec.get("podFailurePolicy")
        tracked = [p for p in pods if TRACKING_FINALIZER in p["metadata"].get("finalizers", [])]
        new_succeeded = [p for p in tracked if p.get("status", {}).get("phase") == "Succeeded"]
        new_failed = [p for p in tracked if is_pod_failed(p, job)]
        counted = [p for p in new_failed if match_pod_failure_policy(policy, p)[1]]
        failed = status.get("failed", 0) + len(counted)
        if "startTime" not in status and not suspended:
            status["startTime"] = ts(now)
        if counted:
            n, _ = self._backoff.get(job["metadata"]["uid"], (0, now))
            self._backoff[job["metadata"]["uid"]] = (n + len(counted), now)
        if new_succeeded:
            self._backoff.pop(job["metadata"]["uid"], None)

        finished: tuple[str, str, str] | None = None  # (interim type, reason, message)
        target = _condition(job, "FailureTarget")
        if target is not None and target["status"] == "True":
            finished = ("FailureTarget", target["reason"], target["message"])
        else:
            for pod in pods:
                if is_pod_failed(pod, job):
                    msg = match_pod_failure_policy(policy, pod)[0]
                    if msg is not None:
                        finished = ("FailureTarget", "PodFailurePolicy", msg)
                        break
        if finished is None:
            if failed > spec.get("backoffLimit", 6):
                finished = ("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            elif self._past_deadline(job, now):
                finished = ("FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline")

        indexed = spec.get("completionMode") == "Indexed"
        succeeded_indexes = set(_parse_indexes(status.get("completedIndexes", "")))
        for pod in new_succeeded:
            if indexed and _index(pod) is not None:
                succeeded_indexes.add(_index(pod))
        succeeded = len(succeeded_indexes) if indexed else status.get("succeeded", 0) + len(new_succeeded)

        active = [p for p in pods if not is_terminal(p) and not p["metadata"].get("deletionTimestamp")]
        if finished is not None:
            for pod in active:
                api.delete_pod(pod)  # keeps the finalizer: removed below, counted as failed
        elif suspended:
            for pod in active:
                _drop_finalizer(pod)
                api.delete_pod(pod)
            _set_condition(job, "Suspended", "True", "JobSuspended", "Job suspended", now)
        else:
            if _condition(job, "Suspended") and _set_condition(job, "Suspended", "False", "JobResumed", "Job resumed", now):
                status["startTime"] = ts(now)  # activeDeadlineSeconds counts from the resume
            self._create_missing(ns, job, pods, succeeded_indexes if indexed else succeeded, now)
        pods = self._pods(ns, job)
        active = [p for p in pods if not is_terminal(p) and not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in pods if not is_terminal(p) and p["metadata"].get("deletionTimestamp")]
        if finished is None and succeeded >= spec.get("completions", 1) and not active:
            finished = ("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods")

        # Finished pods are counted and lose the tracking finalizer; when the Job is finished, all do.
        for pod in new_succeeded + new_failed + (pods if finished else []):
            _drop_finalizer(pod)
        status.update(failed=failed, succeeded=succeeded, active=len(active), terminating=len(terminating),
                      ready=sum(1 for p in active if _ready(p)), uncountedTerminatedPods={})
        if indexed:
            status["completedIndexes"] = _format_indexes(sorted(succeeded_indexes))
        if finished is not None:
            interim, reason, message = finished
            _set_condition(job, interim, "True", reason, message, now)
            if not terminating:  # the terminal condition waits for every pod to be gone or terminal
                final = "Failed" if interim == "FailureTarget" else "Complete"
                _set_condition(job, final, "True", reason, message, now)
                if final == "Complete":
                    status["completionTime"] = ts(now)
        api.bump(job)

    def _past_deadline(self, job: dict[str, Any], now: dt.datetime) -> bool:
        limit, start = job["spec"].get("activeDeadlineSeconds"), job["status"].get("startTime")
        if limit is None or start is None or job["spec"].get("suspend"):
            return False
        return (now - parse_ts(start)).total_seconds() >= limit

    def _create_missing(self, ns: str, job: dict[str, Any], pods: list[dict[str, Any]], done: Any,
                        now: dt.datetime) -> None:
        spec = job["spec"]
        active = [p for p in pods if not is_terminal(p) and not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in pods if not is_terminal(p) and p["metadata"].get("deletionTimestamp")]
        failures, last = self._backoff.get(job["metadata"]["uid"], (0, now))
        if failures and (now - last).total_seconds() < min(BACKOFF_BASE_S * 2 ** (failures - 1), BACKOFF_MAX_S):
            return  # the pod-failure back-off: the controller requeues the Job for later
        if spec.get("completionMode") == "Indexed":
            busy = {_index(p) for p in active + (terminating if only_replace_failed(job) else [])}
            missing = [i for i in range(spec["completions"]) if i not in busy and i not in done]
            for i in missing[: spec["parallelism"] - len(active)]:
                self.api.create_job_pod(ns, job, i)
            return
        want = min(spec.get("completions", 1) - done, spec["parallelism"])
        held = len(active) + (len(terminating) if only_replace_failed(job) else 0)
        for _ in range(max(0, want - held)):
            self.api.create_job_pod(ns, job, None)

    def _ttl(self, ns: str, job: dict[str, Any], now: dt.datetime) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None or job["metadata"].get("deletionTimestamp") or not is_finished(job):
            return
        end = max(parse_ts(c["lastTransitionTime"]) for c in job["status"]["conditions"]
                  if c["type"] in ("Complete", "Failed") and c["status"] == "True")
        if (now - end).total_seconds() >= ttl:
            self.api.delete_object("jobs", ns, job["metadata"]["name"], "Foreground")


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def _drop_finalizer(pod: dict[str, Any]) -> None:
    fins = pod["metadata"].get("finalizers", [])
    if TRACKING_FINALIZER in fins:
        pod["metadata"]["finalizers"] = [f for f in fins if f != TRACKING_FINALIZER]


def _parse_indexes(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _format_indexes(indexes: list[int]) -> str:
    parts, start = [], None
    for i, x in enumerate(indexes):
        if start is None:
            start = x
        if i + 1 == len(indexes) or indexes[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


# -- disruptions (controllers other than the Job controller) -----------------------------------

DISRUPTION_MESSAGES = {
    "PreemptionByScheduler": "{scheduler} preempted this pod",
    "EvictionByEvictionAPI": "Eviction API: evicting",
    "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
    "DeletionByPodGC": "PodGC: node no longer exists",
    "TerminationByKubelet": "The node was low on resource: memory.",
}


def add_disruption(pod: dict[str, Any], reason: str, now: dt.datetime) -> None:
    """The DisruptionTarget condition the disrupting controller writes before it deletes the pod."""
    message = DISRUPTION_MESSAGES[reason].format(scheduler="default-scheduler")
    conds = pod.setdefault("status", {}).setdefault("conditions", [])
    conds[:] = [c for c in conds if c["type"] != "DisruptionTarget"]
    conds.append({"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message,
                  "lastTransitionTime": ts(now)})


# -- Kueue ---------------------------------------------------------------------------------------


def kueue_admit(job: dict[str, Any], saved: dict[str, Any], node_selector: dict[str, str] | None = None,
                tolerations: list[dict[str, Any]] | None = None) -> None:
    """Admission: the flavor's nodeSelector/tolerations are merged into the template, then unsuspend.
    `saved` keeps the template's own values (Kueue keeps them in the Workload) for `kueue_preempt`."""
    pod_spec = job["spec"]["template"]["spec"]
    saved.setdefault(job["metadata"]["uid"],
                     copy.deepcopy({k: pod_spec.get(k) for k in ("nodeSelector", "tolerations")}))
    if node_selector:
        pod_spec["nodeSelector"] = {**(pod_spec.get("nodeSelector") or {}), **node_selector}
    if tolerations:
        pod_spec["tolerations"] = (pod_spec.get("tolerations") or []) + tolerations
    job["spec"]["suspend"] = False


def kueue_preempt(job: dict[str, Any], saved: dict[str, Any]) -> None:
    """Eviction of the workload (preemption): suspend again and restore the template as it was."""
    job["spec"]["suspend"] = True
    original = saved.pop(job["metadata"]["uid"], None)
    if original is not None:
        pod_spec = job["spec"]["template"]["spec"]
        for key, value in original.items():
            if value is None:
                pod_spec.pop(key, None)
            else:
                pod_spec[key] = value
