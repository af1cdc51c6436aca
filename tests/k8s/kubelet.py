"""The kubelet of the stand-in cluster: one node that schedules, starts, watches and stops pods.

`Kubelet.step()` is one pass of what kube-scheduler (for this one node) and the kubelet do:
- schedule: nodeSelector and tolerations against the node's labels and taints, extended resources
  (GPUs) against what the node has left; a pod that fits nowhere gets `PodScheduled=False`,
  reason `Unschedulable`, with the scheduler's message shape;
- start: env resolved (a missing Secret key → waiting `CreateContainerConfigError`), the image pulled by
  the runtime (a refusal → waiting `ErrImagePull`, then `ImagePullBackOff`), the command expanded as the
  kubelet does, then `Running` with `Ready=True`;
- watch: an exited container gives `terminated` (exitCode, reason Completed / Error / OOMKilled,
  the FallbackToLogsOnError message) and phase Succeeded / Failed; its log is published;
- stop: a pod with a deletionTimestamp gets SIGTERM, and SIGKILL (exit 137) once the grace period
  ends (pkg/kubelet/kuberuntime/kuberuntime_container.go `killContainer`);
- evictions (pkg/kubelet/eviction/eviction_manager.go): `evict_for_storage` is `emptyDirLimitEviction`
  (grace 0, phase Failed, reason `Evicted`, and NO DisruptionTarget condition), `evict_for_pressure` is a
  node-pressure eviction (DisruptionTarget `TerminationByKubelet`);
- `lose()`: the node stops answering; the node lifecycle controller marks its pods `Ready=False` and
  nothing on it ever reaches a terminal phase again (a deleted pod stays Terminating).

What runs a container is pluggable (`ContainerRuntime`): `SimulatedRuntime` plays scripted processes;
tests/e2e/container_kubelet.py's `DockerRuntime` runs real containers behind the same calls. Time is the
API server's clock, so with real processes the grace period is real seconds between SIGTERM and SIGKILL.

Env and command rules (Kubernetes `third_party/forked/golang/expansion`): `$(NAME)` is replaced by the
value of a variable defined for the container; an undefined `$(NAME)` stays as written; `$$` is an
escaped `$`. Env values come from `value` or, for the downward API, from `fieldRef` on the pod's
metadata (name, namespace, uid, labels['k'], annotations['k']). Secret references resolve from `secrets`.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from controllers import add_disruption, is_terminal, parse_ts, ts

if TYPE_CHECKING:
    from fake_apiserver import FakeApiServer


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def container_env(pod: dict[str, Any], container: str, secrets: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    env: dict[str, str] = {}
    for var in spec.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = (secrets or {}).get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise LookupError(f"secret {ref['name']}/{ref['key']} missing (CreateContainerConfigError)")
            if value is not None:
                env[var["name"]] = value
    return env


def command_line(pod: dict[str, Any], container: str, secrets: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The argv the container runtime would exec."""
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    env = container_env(pod, container, secrets)
    return [expand(arg, env) for arg in spec.get("command", []) + spec.get("args", [])]


def expand(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _field(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    if path in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return meta[path.split(".")[1]]
    m = _FIELD.match(path)
    if not m:
        raise ValueError(f"unsupported fieldRef {path}")
    return meta.get(m[1], {}).get(m[2], "")


# -- the container runtime (pluggable) ----------------------------------------------------------


class ImagePullError(Exception):
    """Raised by `ContainerRuntime.pull`: `reason` is the kubelet's (ErrImagePull, InvalidImageName…)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class ContainerConfigError(Exception):
    """Raised by `ContainerRuntime.start` for a spec the node cannot run (a volume kind it lacks, a root
    image under runAsNonRoot…): the container is not created, waiting `CreateContainerConfigError`."""


class ContainerProcess(Protocol):
    oom_killed: bool  # the kernel's OOM killer ended it (the kubelet then reports reason OOMKilled)

    def poll(self) -> int | None:
        """The exit code once it exited, else None."""

    def signal(self, signum: int) -> None:
        """SIGTERM on graceful deletion, SIGKILL when the grace period is over."""

    def logs(self) -> str:
        """Everything it wrote to stdout/stderr so far."""


class ContainerRuntime(Protocol):
    def pull(self, image: str) -> None:
        """Make the image available or raise ImagePullError."""

    def start(self, pod: dict[str, Any], container: dict[str, Any], argv: list[str], env: dict[str, str]) -> ContainerProcess:
        """Run the container's `argv` (command + args) with `env`, both resolved and expanded by the kubelet;
        raise ContainerConfigError for a spec this runtime refuses."""


@dataclass
class Script:
    """A simulated trainer: runs `steps` kubelet passes (None: until signalled), then exits `exit_code`.
    On SIGTERM it exits `on_sigterm` (None: ignores it and is SIGKILLed at the end of the grace period)."""

    exit_code: int = 0
    steps: int | None = 1
    on_sigterm: int | None = 20  # the trainer's "preempted, checkpoint saved" code
    oom: bool = False  # the OOM killer ends it instead of exiting (137, OOMKilled)
    log: str = ""


@dataclass
class SimulatedProcess:
    script: Script
    argv: list[str]
    env: dict[str, str]
    ticks: int = 0
    code: int | None = None
    oom_killed: bool = False
    signals: list[int] = field(default_factory=list)

    def poll(self) -> int | None:
        if self.code is None:
            self.ticks += 1
            if self.script.steps is not None and self.ticks > self.script.steps:
                self.oom_killed = self.script.oom
                self.code = 137 if self.script.oom else self.script.exit_code
        return self.code

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.code is not None:
            return
        if signum == signal.SIGKILL:
            self.code = 137
        elif self.script.on_sigterm is not None:
            self.code = self.script.on_sigterm

    def logs(self) -> str:
        return self.script.log


class SimulatedRuntime:
    """Scripted processes: `scripts[<completion index or 0>]`, else `default`; `bad_images` refuse pulls."""

    def __init__(self, default: Script | None = None, scripts: dict[int, Script] | None = None,
                 bad_images: dict[str, tuple[str, str]] | None = None) -> None:
        self.default = default or Script()
        self.scripts = dict(scripts or {})
        self.bad_images = dict(bad_images or {})
        self.started: list[SimulatedProcess] = []

    def pull(self, image: str) -> None:
        if image in self.bad_images:
            raise ImagePullError(*self.bad_images[image])

    def start(self, pod: dict[str, Any], container: dict[str, Any], argv: list[str], env: dict[str, str]) -> SimulatedProcess:
        index = int(pod["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index", 0))
        proc = SimulatedProcess(self.scripts.get(index, self.default), argv, env)
        self.started.append(proc)
        return proc


# -- the kubelet (and the scheduler, for its one node) --------------------------------------------


def terminate_pod(pod: dict[str, Any], exit_code: int, now: dt.datetime, reason: str | None = None) -> None:
    """Every container of `pod` ended with `exit_code`: terminated states, terminal phase, not Ready."""
    status = pod.setdefault("status", {})
    statuses = status.get("containerStatuses") or [
        {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": 0, "ready": False}
        for c in pod["spec"]["containers"]]
    for cs in statuses:
        started = (cs.get("state", {}).get("running") or {}).get("startedAt", ts(now))
        why = reason or ("Completed" if exit_code == 0 else "Error")
        cs.update(ready=False, started=False, state={"terminated": {
            "exitCode": exit_code, "reason": why, "startedAt": started, "finishedAt": ts(now)}})
    status["containerStatuses"] = statuses
    status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
    _set_pod_condition(pod, "Ready", "False", "PodCompleted" if exit_code == 0 else "PodFailed", now)


def _set_pod_condition(pod: dict[str, Any], ctype: str, value: str, reason: str | None, now: dt.datetime,
                       message: str | None = None) -> None:
    conds = pod.setdefault("status", {}).setdefault("conditions", [])
    conds[:] = [c for c in conds if c["type"] != ctype]
    cond = {"type": ctype, "status": value, "lastTransitionTime": ts(now)}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    conds.append(cond)


def _requests(pod: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in pod["spec"]["containers"]:
        for key, value in (c.get("resources", {}).get("limits") or {}).items():
            if "/" in key:  # extended resources (GPUs): whole units
                out[key] = out.get(key, 0) + int(value)
    return out


class Kubelet:
    """One node. `runtime` runs the containers; `secrets` are the namespace's Secrets ({name: {key: value}})."""

    def __init__(self, api: FakeApiServer, runtime: ContainerRuntime, *, node: str = "gpu-node-1",
                 labels: dict[str, str] | None = None, capacity: dict[str, int] | None = None,
                 taints: list[dict[str, str]] | None = None, secrets: dict[str, dict[str, str]] | None = None,
                 pull_backoff_after: int = 1) -> None:
        self.api, self.runtime, self.node = api, runtime, node
        self.labels = {"kubernetes.io/hostname": node, **(labels or {})}
        self.capacity = dict(capacity if capacity is not None else {"nvidia.com/gpu": 8})
        self.taints = list(taints or [])
        self.secrets = secrets or {}
        self.processes: dict[str, ContainerProcess] = {}  # pod uid → its trainer process
        self._pulls: dict[str, int] = {}
        self._termed: set[str] = set()
        self._pull_backoff_after = pull_backoff_after

    # -- one pass ---------------------------------------------------------------------------------
    def step(self) -> None:
        api = self.api
        with api._lock:
            if self.node in api.lost_nodes:
                return
            for (resource, _, _), pod in sorted(api.objects.items()):
                if resource != "pods" or is_terminal(pod):
                    continue
                if not pod["spec"].get("nodeName"):
                    if not pod["metadata"].get("deletionTimestamp"):
                        self._schedule(pod)
                    continue
                if pod["spec"]["nodeName"] == self.node:
                    self._run(pod)
            api.collect()

    def run_until_settled(self, passes: int = 10) -> None:
        """Alternate Job controller and kubelet passes (what a cluster does continuously)."""
        for _ in range(passes):
            self.api.sync_jobs()
            self.step()
        self.api.sync_jobs()

    # -- scheduling -----------------------------------------------------------------------------
    def _schedule(self, pod: dict[str, Any]) -> None:
        now = self.api.now()
        spec = pod["spec"]
        problem = None
        selector = spec.get("nodeSelector") or {}
        if any(self.labels.get(k) != v for k, v in selector.items()):
            problem = "1 node(s) didn't match Pod's node affinity/selector"
        for taint in self.taints:
            if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
                    _tolerates(t, taint) for t in spec.get("tolerations") or []):
                problem = f"1 node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"
        free = dict(self.capacity)
        for (r, _, _), other in self.api.objects.items():
            if r == "pods" and other["spec"].get("nodeName") == self.node and not is_terminal(other):
                for key, n in _requests(other).items():
                    free[key] = free.get(key, 0) - n
        for key, n in _requests(pod).items():
            if free.get(key, 0) < n:
                problem = problem or f"1 Insufficient {key}"
        if problem:
            _set_pod_condition(pod, "PodScheduled", "False", "Unschedulable", now,
                               f"0/1 nodes are available: {problem}. preemption: 0/1 nodes are available: "
                               "1 No preemption victims found for incoming pod.")
            self.api.bump(pod)
            return
        spec["nodeName"] = self.node
        _set_pod_condition(pod, "PodScheduled", "True", None, now)
        self.api.bump(pod)

    # -- running --------------------------------------------------------------------------------
    def _run(self, pod: dict[str, Any]) -> None:
        now, uid = self.api.now(), pod["metadata"]["uid"]
        proc = self.processes.get(uid)
        deleting = pod["metadata"].get("deletionTimestamp")
        if proc is None:
            if deleting:  # never started: nothing to stop
                terminate_pod(pod, 137, now, "ContainerStatusUnknown")
                self.api.bump(pod)
                return
            self._start(pod)
            return
        if deleting:
            if uid not in self._termed:  # SIGTERM once, SIGKILL when the grace period is over
                self._termed.add(uid)
                proc.signal(signal.SIGTERM)
            if now >= parse_ts(deleting) and proc.poll() is None:
                proc.signal(signal.SIGKILL)
        code = proc.poll()
        self.api.set_log(pod["metadata"]["namespace"], pod["metadata"]["name"], proc.logs())
        if code is not None:
            oom = getattr(proc, "oom_killed", False)
            terminate_pod(pod, code, now, "OOMKilled" if oom else None)
            if code != 0 and not oom:
                tail = proc.logs().splitlines()[-80:]  # terminationMessagePolicy FallbackToLogsOnError
                for cs in pod["status"]["containerStatuses"]:
                    cs["state"]["terminated"]["message"] = "\n".join(tail)[-4096:]
            self.api.bump(pod)

    def _start(self, pod: dict[str, Any]) -> None:
        now = self.api.now()
        container = pod["spec"]["containers"][0]
        waiting = None
        try:
            argv = command_line(pod, container["name"], self.secrets)
            env = container_env(pod, container["name"], self.secrets)
        except LookupError as exc:
            waiting = ("CreateContainerConfigError", str(exc).split(" (")[0])
        if waiting is None:
            try:
                self.runtime.pull(container["image"])
            except ImagePullError as exc:
                n = self._pulls[pod["metadata"]["uid"]] = self._pulls.get(pod["metadata"]["uid"], 0) + 1
                retrying = exc.reason == "ErrImagePull" and n > self._pull_backoff_after
                waiting = ("ImagePullBackOff" if retrying else exc.reason,
                           f'Back-off pulling image "{container["image"]}": {exc.message}' if retrying else exc.message)
        if waiting is None:
            try:
                self.processes[pod["metadata"]["uid"]] = self.runtime.start(pod, container, argv, env)
            except ContainerConfigError as exc:
                waiting = ("CreateContainerConfigError", str(exc))
        status = pod.setdefault("status", {})
        if waiting is not None:
            status["containerStatuses"] = [{"name": container["name"], "image": container["image"], "imageID": "",
                                            "ready": False, "restartCount": 0, "started": False,
                                            "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}]
            self.api.bump(pod)
            return
        status.update(phase="Running", startTime=ts(now), hostIP="10.0.0.1", podIP="10.1.0.2")
        status["containerStatuses"] = [{"name": container["name"], "image": container["image"], "imageID": "",
                                        "ready": True, "restartCount": 0, "started": True,
                                        "state": {"running": {"startedAt": ts(now)}}}]
        _set_pod_condition(pod, "Ready", "True", None, now)
        self.api.bump(pod)

    # -- node events ----------------------------------------------------------------------------
    def evict_for_storage(self, ns: str, pod_name: str, volume: str = "scratch") -> None:
        """The eviction manager's emptyDir limit eviction: grace 0, no DisruptionTarget."""
        with self.api._lock:
            pod = self.api.objects[("pods", ns, pod_name)]
            limit = next((v.get("emptyDir", {}).get("sizeLimit") for v in pod["spec"].get("volumes", [])
                          if v["name"] == volume), None)
            proc = self.processes.get(pod["metadata"]["uid"])
            if proc is not None:
                proc.signal(signal.SIGKILL)
            terminate_pod(pod, 137, self.api.now())
            pod["status"].update(reason="Evicted", message=f'Usage of EmptyDir volume "{volume}" exceeds the limit "{limit}". ')
            self.api.bump(pod)

    def evict_for_pressure(self, ns: str, pod_name: str) -> None:
        """A node-pressure eviction: DisruptionTarget TerminationByKubelet, then the pod is stopped."""
        with self.api._lock:
            pod = self.api.objects[("pods", ns, pod_name)]
            add_disruption(pod, "TerminationByKubelet", self.api.now())
            proc = self.processes.get(pod["metadata"]["uid"])
            code = 143
            if proc is not None:
                proc.signal(signal.SIGTERM)
                code = proc.poll() if proc.poll() is not None else 137
            terminate_pod(pod, code, self.api.now())
            pod["status"].update(reason="Evicted", message="The node was low on resource: memory. ")
            self.api.bump(pod)

    def lose(self) -> None:
        """The node stops answering: its pods are marked not Ready and never change again."""
        with self.api._lock:
            self.api.lost_nodes.add(self.node)
            for (r, _, _), pod in self.api.objects.items():
                if r == "pods" and pod["spec"].get("nodeName") == self.node and not is_terminal(pod):
                    _set_pod_condition(pod, "Ready", "False", "NodeLost", self.api.now(),
                                       "Node is not ready")  # the node lifecycle controller's MarkPodsNotReady
                    self.api.bump(pod)


def _tolerates(toleration: dict[str, Any], taint: dict[str, str]) -> bool:
    if toleration.get("effect") not in (None, taint.get("effect")):
        return False
    if toleration.get("operator") == "Exists":
        return toleration.get("key") in (None, taint["key"])
    return toleration.get("key") == taint["key"] and toleration.get("value") == taint.get("value")
