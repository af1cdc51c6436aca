"""A kubelet and a Job controller for the container end-to-end run, on top of the API stand-in.

Every pod the stand-in's Job controller creates (`sync_jobs`, from the Job object the launcher POSTed)
runs as one `docker run --rm` container built from that pod's spec, nothing else:
- image, `command`/`args` (command replaces the image's ENTRYPOINT, args its CMD; `$(VAR)` expanded
  as the kubelet does), `workingDir`;
- env: `value`, downward-API `fieldRef`, `secretKeyRef` from the Secrets given to this kubelet (a
  missing, non-optional key is `CreateContainerConfigError`, as on a node);
- volumes: an emptyDir is a fresh folder of this machine, bind-mounted, mode 0777, or 2777 with
  group `fsGroup`, as the kubelet makes it (`medium: Memory` at /dev/shm sets the shm size; elsewhere
  it is on disk here); hostPath is a bind mount; other volume kinds are refused
  (`CreateContainerConfigError`), so a manifest that needs one fails loudly here;
- securityContext (pod and container): runAsUser/runAsGroup, fsGroup and supplementalGroups as extra
  groups, runAsNonRoot (checked against the image's USER when no runAsUser is set),
  readOnlyRootFilesystem, capabilities, allowPrivilegeEscalation, privileged, seccomp Unconfined;
- DNS: host networking (every container shares 127.0.0.1, as pods share a flat pod network), with
  the names of headless Services and of the pods behind them (`<hostname>.<subdomain>.<ns>.svc`)
  given to every container as `--add-host NAME:127.0.0.1`.

What it writes back, through the stand-in's status calls: the pod's phase and container state
(waiting/running/terminated with exit code, reason `Completed` or `Error`, finish time, and with
`terminationMessagePolicy: FallbackToLogsOnError` the log's tail as the message), the pod log, and the
Job's counts and `Complete`/`Failed` conditions (podFailurePolicy `FailJob` rules on exit codes, then
backoffLimit; a failed Indexed Job stops its other pods). A pod being deleted gets SIGTERM and
SIGKILL after its `terminationGracePeriodSeconds` (`docker stop`), then the stand-in is told that the
terminations finished. Not modelled: pod retries inside one Job (a failed pod is never replaced, so
backoffLimit > 0 only delays the Failed condition), resource limits, probes, init containers.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
from fake_apiserver import FakeApiServer  # noqa: E402
from kubelet import container_env, expand  # noqa: E402

LOG_TAIL_BYTES = 2048  # what FallbackToLogsOnError keeps (the kubelet: 2048 bytes or 80 lines)
LOG_KEEP_BYTES = 1 << 20


def docker_bin() -> str:
    return os.environ.get("DOCKER_BIN") or "docker"


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([docker_bin(), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return proc


class PodConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError: the container is never started."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i|[kKMGT])?", str(quantity))
    if not m:
        raise PodConfigError(f"quantity {quantity!r} is not supported by this kubelet")
    return int(m[1]) * units.get(m[2] or "", 1)


def _dns_names(api: FakeApiServer, ns: str) -> list[str]:
    """Names the cluster DNS would answer for headless Services and their pods' hostnames."""
    names: list[str] = []
    pods = [p for n in api.names("pods", ns) if (p := api.get("pods", ns, n)) is not None]
    for svc_name in api.names("services", ns):
        svc = api.get("services", ns, svc_name)
        if svc is None:
            continue
        names += [f"{svc_name}.{ns}.svc", f"{svc_name}.{ns}.svc.cluster.local"]
        selector = svc.get("spec", {}).get("selector") or {}
        for pod in pods:
            labels = pod["metadata"].get("labels", {})
            spec = pod["spec"]
            if (selector and all(labels.get(k) == v for k, v in selector.items())
                    and spec.get("hostname") and spec.get("subdomain") == svc_name):
                names += [f"{spec['hostname']}.{svc_name}.{ns}.svc", f"{spec['hostname']}.{svc_name}.{ns}.svc.cluster.local"]
    return sorted(set(names))


def docker_run_argv(pod: dict[str, Any], container: str, *, secrets: dict[str, dict[str, str]], env_file: Path,
                    volume_root: Path, name: str, labels: dict[str, str], hosts: list[str],
                    image_user: str | None) -> list[str]:
    """`docker run` arguments for one container of `pod`, from its spec alone (PodConfigError if unsupported)."""
    spec = pod["spec"]
    c = next((c for c in spec["containers"] if c["name"] == container), None)
    if c is None:
        raise PodConfigError(f"no container {container!r} in the pod")
    psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    try:
        env = container_env(pod, container, secrets)
    except LookupError as exc:
        raise PodConfigError(str(exc)) from None
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    env_file.chmod(0o600)

    argv = ["run", "--rm", "--name", name, "--network", "host", "--env-file", str(env_file)]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    for host in hosts:
        argv += ["--add-host", f"{host}:127.0.0.1"]

    user = csc.get("runAsUser", psc.get("runAsUser"))
    group = csc.get("runAsGroup", psc.get("runAsGroup"))
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        effective = str(user) if user is not None else (image_user or "").split(":")[0]
        if effective in ("", "0", "root"):
            raise PodConfigError("container has runAsNonRoot and image will run as root")
        if not effective.isdigit():
            raise PodConfigError(f"container has runAsNonRoot and image has non-numeric user ({effective}), "
                                 "cannot verify user is non-root")
    if user is not None:
        argv += ["--user", str(user) if group is None else f"{user}:{group}"]
    fs_group = psc.get("fsGroup")
    for gid in ([fs_group] if fs_group is not None else []) + list(psc.get("supplementalGroups") or []):
        argv += ["--group-add", str(gid)]
    if csc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    if csc.get("privileged"):
        argv.append("--privileged")
    if csc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        argv += ["--cap-drop", cap]
    for cap in caps.get("add") or []:
        argv += ["--cap-add", cap]
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise PodConfigError(f"seccompProfile {seccomp} is not supported by this kubelet")

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in c.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise PodConfigError(f"volumeMount {mount['name']!r}: no such volume in the pod")
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise PodConfigError(f"volumeMount {mount['name']!r}: subPath is not supported by this kubelet")
        path, read_only = mount["mountPath"], bool(mount.get("readOnly"))
        if "emptyDir" in volume:
            empty = volume["emptyDir"] or {}
            size = empty.get("sizeLimit")
            if path == "/dev/shm" and empty.get("medium") == "Memory":
                argv += ["--shm-size", str(_quantity_bytes(size)) if size else "64m"]
                continue
            # What the kubelet does: a fresh folder of the node, bind-mounted (Docker's own tmpfs mounts
            # would take the mode of the image's folder at that path, which Kubernetes never does).
            folder = volume_root / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, 0, fs_group if fs_group is not None else 0)
            folder.chmod(0o2777 if fs_group is not None else 0o777)
            argv += ["-v", f"{folder}:{path}:{'ro' if read_only else 'rw'}"]
        elif "hostPath" in volume:
            argv += ["-v", f"{volume['hostPath']['path']}:{path}:{'ro' if read_only else 'rw'}"]
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise PodConfigError(f"volume {mount['name']!r}: {kind} volumes are not supported by this kubelet")

    if c.get("workingDir"):
        argv += ["--workdir", c["workingDir"]]
    command = [expand(a, env) for a in c.get("command") or []]
    args = [expand(a, env) for a in c.get("args") or []]
    if command:
        argv += ["--entrypoint", command[0], c["image"], *command[1:], *args]
    else:
        argv += [c["image"], *args]
    return argv


@dataclass
class _Run:
    pod: str
    container: str  # the docker container's name
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes]
    created_at: str
    created_wall: float = field(default_factory=time.time)  # `docker run` was called (for start-up figures)
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    stopping: bool = False
    reported: bool = False

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - LOG_KEEP_BYTES))
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


class ContainerKubelet:
    """Runs the pods of `namespace` as containers until `stop()`; one pass every `poll_s` seconds."""

    def __init__(self, api: FakeApiServer, namespace: str, *, secrets: dict[str, dict[str, str]], workdir: Path,
                 label: tuple[str, str], poll_s: float = 0.5) -> None:
        self.api, self.ns, self.secrets, self.workdir = api, namespace, secrets, workdir
        self.label, self.poll_s = label, poll_s
        self.runs: dict[str, _Run] = {}  # pod name → its container
        self.argv: dict[str, list[str]] = {}  # pod name → the `docker run` arguments it was started with
        self.errors: list[str] = []  # passes that raised (a test fails on them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._image_users: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> ContainerKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="container-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for run in self.runs.values():
            if run.proc.poll() is None:
                docker("rm", "-f", run.container, check=False)
                try:
                    run.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    run.proc.kill()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 (kept, and shown by the test that checks `errors`)
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)

    # -- one pass -------------------------------------------------------------------------------
    def sync(self) -> None:
        with self._lock:
            self.api.sync_jobs()
            for name in self.api.names("pods", self.ns):
                pod = self.api.get("pods", self.ns, name)
                if pod is not None:
                    self._sync_pod(pod)
            self._sync_jobs()
            self._finish_terminations()

    def container_of(self, pod: str) -> str | None:
        run = self.runs.get(pod)
        return run.container if run else None

    def _sync_pod(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        run = self.runs.get(name)
        if run is None:
            if deleting or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            if any(cs.get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
                   for cs in pod.get("status", {}).get("containerStatuses") or []):
                return  # reported once; a real kubelet retries, the config does not change here
            self._start(pod)
            return
        if run.proc.poll() is None:
            if run.started_at is None:
                probe = docker("container", "inspect", "-f", "{{.State.Running}}", run.container, check=False, timeout=20)
                if probe.stdout.strip() == "true":
                    run.started_at = _now()
                    self._set_pod_status(pod, run)
            if deleting and not run.stopping:
                self._terminate(pod, run)
            self.api.set_log(self.ns, name, run.log_text())
            return
        if not run.reported:
            run.exit_code = run.proc.returncode
            run.finished_at = _now()
            run.reported = True
            self.api.set_log(self.ns, name, run.log_text())
            self._set_pod_status(pod, run)

    def _start(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]["name"]
        image = pod["spec"]["containers"][0]["image"]
        docker_name = f"{self.label[1]}-{name}"
        env_file = self.workdir / f"{name}.env"
        log_path = self.workdir / f"{name}.log"
        try:
            argv = docker_run_argv(pod, container, secrets=self.secrets, env_file=env_file,
                                   volume_root=self.workdir / "volumes" / name, name=docker_name,
                                   labels={self.label[0]: self.label[1]}, hosts=_dns_names(self.api, self.ns),
                                   image_user=self._image_user(image))
        except PodConfigError as exc:
            self.api.set_status("pods", self.ns, name, {
                "phase": "Pending",
                "containerStatuses": [_container_status(container, image, {"waiting": {
                    "reason": "CreateContainerConfigError", "message": str(exc)}})],
            })
            return
        self.argv[name] = argv
        log = open(log_path, "wb")  # noqa: SIM115 (the child writes it; closed below once started)
        proc = subprocess.Popen([docker_bin(), *argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        run = _Run(pod=name, container=docker_name, argv=argv, log_path=log_path, proc=proc, created_at=_now())
        self.runs[name] = run
        self._set_pod_status(pod, run)

    def _image_user(self, image: str) -> str:
        if image not in self._image_users:
            probe = docker("image", "inspect", "-f", "{{.Config.User}}", image, check=False, timeout=30)
            if probe.returncode != 0:
                raise RuntimeError(f"image {image} is not in the Docker engine (run `make images`): {probe.stderr.strip()}")
            self._image_users[image] = probe.stdout.strip()
        return self._image_users[image]

    def _terminate(self, pod: dict[str, Any], run: _Run) -> None:
        """Pod deletion: SIGTERM, SIGKILL after the grace period (in the background: it may take that long)."""
        run.stopping = True
        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        threading.Thread(target=docker, args=("stop", "--time", str(grace), run.container),
                         kwargs={"timeout": grace + 60, "check": False}, daemon=True).start()

    def _set_pod_status(self, pod: dict[str, Any], run: _Run) -> None:
        c = pod["spec"]["containers"][0]
        if run.exit_code is not None:
            code = run.exit_code
            terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                          "startedAt": run.started_at or run.created_at, "finishedAt": run.finished_at}
            if 125 <= code <= 127 and run.started_at is None:  # the engine could not start the container
                terminated.update(exitCode=128, reason="StartError")
            if code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                terminated["message"] = run.log_text()[-LOG_TAIL_BYTES:]
            status = {"phase": "Succeeded" if code == 0 else "Failed", "startTime": run.created_at,
                      "containerStatuses": [_container_status(c["name"], c["image"], {"terminated": terminated})]}
        elif run.started_at is not None:
            status = {"phase": "Running", "startTime": run.created_at,
                      "containerStatuses": [_container_status(c["name"], c["image"], {"running": {"startedAt": run.started_at}},
                                                              ready=True)]}
        else:
            status = {"phase": "Pending", "startTime": run.created_at,
                      "containerStatuses": [_container_status(c["name"], c["image"], {"waiting": {"reason": "ContainerCreating"}})]}
        self.api.set_status("pods", self.ns, run.pod, status)

    # -- Job controller -------------------------------------------------------------------------
    def _sync_jobs(self) -> None:
        for name in self.api.names("jobs", self.ns):
            job = self.api.get("jobs", self.ns, name)
            if job is None or job["spec"].get("suspend"):
                continue
            status = dict(job.get("status") or {})
            if any(c.get("status") == "True" and c["type"] in ("Complete", "Failed") for c in status.get("conditions") or []):
                continue
            pods = self.api.pods_of(self.ns, name)
            phases = [p.get("status", {}).get("phase") for p in pods]
            spec = job["spec"]
            indexed = spec.get("completionMode") == "Indexed"
            succeeded = [p for p in pods if p.get("status", {}).get("phase") == "Succeeded"]
            failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
            status.update(active=sum(1 for ph in phases if ph in ("Pending", "Running")),
                          succeeded=len(succeeded), failed=len(failed), startTime=status.get("startTime") or _now())
            status["ready"] = sum(1 for ph in phases if ph == "Running")
            if indexed:
                done = sorted(int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]) for p in succeeded)
                status["completedIndexes"] = ",".join(str(i) for i in done)
            condition = None
            for pod in failed:
                rule = _failure_rule(spec.get("podFailurePolicy"), pod)
                if rule is not None:
                    index, code = rule
                    condition = ("Failed", "PodFailurePolicy",
                                 f"Container trainer for pod {self.ns}/{pod['metadata']['name']} failed with exit code "
                                 f"{code} matching FailJob rule at index {index}")
                    break
            if condition is None and len(failed) > spec.get("backoffLimit", 6):
                condition = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            if condition is None and len(succeeded) >= spec.get("completions", 1):
                condition = ("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
            if condition is not None:
                now = _now()
                kind, reason, message = condition
                extra = [{"type": "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget", "status": "True",
                          "reason": reason, "message": message, "lastProbeTime": now, "lastTransitionTime": now}]
                status["conditions"] = extra + [{"type": kind, "status": "True", "reason": reason, "message": message,
                                                 "lastProbeTime": now, "lastTransitionTime": now}]
                if kind == "Complete":
                    status["completionTime"] = now
                else:  # the Job controller deletes the pods still running; here their containers are stopped
                    for pod in pods:
                        run = self.runs.get(pod["metadata"]["name"])
                        if run is not None and run.proc.poll() is None and not run.stopping:
                            self._terminate(pod, run)
            self.api.set_status("jobs", self.ns, name, status)

    def _finish_terminations(self) -> None:
        """Tell the stand-in that deleted pods are gone, once none of them has a container left."""
        deleting = [n for n in self.api.names("pods", self.ns)
                    if ((self.api.get("pods", self.ns, n) or {}).get("metadata", {}).get("deletionTimestamp"))]
        if deleting and all(n not in self.runs or self.runs[n].reported for n in deleting):
            self.api.finish_terminations()


def _container_status(name: str, image: str, state: dict[str, Any], ready: bool = False) -> dict[str, Any]:
    return {"name": name, "image": image, "imageID": "", "ready": ready, "restartCount": 0,
            "started": "running" in state, "state": state}


def _failure_rule(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[int, int] | None:
    """(rule index, exit code) of the first podFailurePolicy FailJob rule matching a failed pod."""
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = cs.get("state", {}).get("terminated")
        if not term:
            continue
        for index, rule in enumerate((policy or {}).get("rules") or []):
            codes = rule.get("onExitCodes")
            if not codes or (codes.get("containerName") not in (None, cs["name"])):
                continue
            hit = term["exitCode"] in codes["values"]
            if (hit if codes["operator"] == "In" else not hit):
                if rule["action"] == "FailJob":
                    return index, term["exitCode"]
                break
    return None


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
