"""The container runtime of the e2e node: the stand-in's kubelet (tests/k8s/kubelet.py) runs every pod
the stand-in's Job controller creates as one `docker run --rm` container, through `DockerRuntime`.

The Job controller (pod failure policy, backoffLimit, FailureTarget → Failed, finalizers, Indexed
hostnames and JOB_COMPLETION_INDEX) and the kubelet (scheduling, env and Secrets, `$(VAR)` expansion,
graceful deletion with SIGTERM then SIGKILL after the grace period, terminated states and the log
tail) are the stand-in's own. What is container-specific is here, read from the pod's spec alone (the
pod the Job controller made from the Job object the launcher POSTed):
- image, `command`/`args` (the kubelet's expanded argv: command replaces the image's ENTRYPOINT, args
  its CMD), `workingDir`; the env the kubelet resolved (values, downward API, Secret keys);
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
The process calls map onto the engine: `signal` is `docker kill --signal`, a SIGKILLed container's
`docker run` exits 137, `oom_killed` is the engine's `oom` event for that container, `logs` is what
`docker run` printed. An image missing from the engine is an image-pull refusal (no registry here).
Not modelled: resource limits, probes, init containers.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
from fake_apiserver import FakeApiServer  # noqa: E402
from kubelet import ContainerConfigError, ImagePullError, Kubelet  # noqa: E402

LOG_KEEP_BYTES = 1 << 20  # the log the kubelet publishes: the last MiB


def docker_bin() -> str:
    return os.environ.get("DOCKER_BIN") or "docker"


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([docker_bin(), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return proc


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+)([KMGT]i|[kKMGT])?", str(quantity))
    if not m:
        raise ContainerConfigError(f"quantity {quantity!r} is not supported by this node")
    return int(m[1]) * units.get(m[2] or "", 1)


def dns_names(api: FakeApiServer, ns: str) -> list[str]:
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


def docker_run_argv(pod: dict[str, Any], container: dict[str, Any], argv: list[str], *, env_file: Path,
                    volume_root: Path, name: str, labels: dict[str, str], hosts: list[str],
                    image_user: str | None) -> list[str]:
    """`docker run` arguments for `container` of `pod` running `argv` (the kubelet's command + args),
    from the pod's spec alone; ContainerConfigError for what this node cannot run."""
    spec = pod["spec"]
    psc, csc = spec.get("securityContext") or {}, container.get("securityContext") or {}
    out = ["run", "--rm", "--name", name, "--network", "host", "--env-file", str(env_file)]
    for key, value in labels.items():
        out += ["--label", f"{key}={value}"]
    for host in hosts:
        out += ["--add-host", f"{host}:127.0.0.1"]

    user = csc.get("runAsUser", psc.get("runAsUser"))
    group = csc.get("runAsGroup", psc.get("runAsGroup"))
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):  # what the kubelet verifies before creating it
        effective = str(user) if user is not None else (image_user or "").split(":")[0]
        if effective in ("", "0", "root"):
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
        if not effective.isdigit():
            raise ContainerConfigError(f"container has runAsNonRoot and image has non-numeric user ({effective}), "
                                       "cannot verify user is non-root")
    if user is not None:
        out += ["--user", str(user) if group is None else f"{user}:{group}"]
    fs_group = psc.get("fsGroup")
    for gid in ([fs_group] if fs_group is not None else []) + list(psc.get("supplementalGroups") or []):
        out += ["--group-add", str(gid)]
    if csc.get("readOnlyRootFilesystem"):
        out.append("--read-only")
    if csc.get("privileged"):
        out.append("--privileged")
    if csc.get("allowPrivilegeEscalation") is False:
        out += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        out += ["--cap-drop", cap]
    for cap in caps.get("add") or []:
        out += ["--cap-add", cap]
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        out += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise ContainerConfigError(f"seccompProfile {seccomp} is not supported by this node")

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ContainerConfigError(f"volumeMount {mount['name']!r}: no such volume in the pod")
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise ContainerConfigError(f"volumeMount {mount['name']!r}: subPath is not supported by this node")
        path, read_only = mount["mountPath"], bool(mount.get("readOnly"))
        if "emptyDir" in volume:
            empty = volume["emptyDir"] or {}
            size = empty.get("sizeLimit")
            if path == "/dev/shm" and empty.get("medium") == "Memory":
                out += ["--shm-size", str(_quantity_bytes(size)) if size else "64m"]
                continue
            # What the kubelet does: a fresh folder of the node, bind-mounted (Docker's own tmpfs mounts
            # would take the mode of the image's folder at that path, which Kubernetes never does).
            folder = volume_root / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, 0, fs_group if fs_group is not None else 0)
            folder.chmod(0o2777 if fs_group is not None else 0o777)
            out += ["-v", f"{folder}:{path}:{'ro' if read_only else 'rw'}"]
        elif "hostPath" in volume:
            out += ["-v", f"{volume['hostPath']['path']}:{path}:{'ro' if read_only else 'rw'}"]
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise ContainerConfigError(f"volume {mount['name']!r}: {kind} volumes are not supported by this node")

    if container.get("workingDir"):
        out += ["--workdir", container["workingDir"]]
    if container.get("command"):
        out += ["--entrypoint", argv[0], container["image"], *argv[1:]]
    else:
        out += [container["image"], *argv]
    return out


@dataclass
class DockerProcess:
    """One container: the `docker run` client's process stands for it (its exit code is the container's)."""

    pod: str
    name: str  # the container's name in the engine
    argv: list[str]  # what `docker run` was given
    log_path: Path
    proc: subprocess.Popen[bytes]
    created_wall: float = field(default_factory=time.time)  # `docker run` was called (for start-up figures)
    oom_killed: bool = False
    _code: int | None = None
    _pending: int | None = None  # a signal sent before the engine had the container running
    _retry_at: float = 0.0

    def poll(self) -> int | None:
        if self._code is None:
            code = self.proc.poll()
            if code is None:
                if self._pending is not None and time.monotonic() >= self._retry_at:
                    self.signal(self._pending)
                return None
            self._code = code
            if code == 137:  # SIGKILL: by `docker kill`, or by the OOM killer
                self.oom_killed = _oom_event(self.name, self.created_wall)
        return self._code

    def signal(self, signum: int) -> None:
        if self.proc.poll() is not None:
            return
        name = signal.Signals(signum).name.removeprefix("SIG")
        sent = docker("kill", "--signal", name, self.name, check=False, timeout=30).returncode == 0
        if sent:
            self._pending = None
        elif self._pending != signal.SIGKILL:  # not created yet (an image copy can take a while): retry
            self._pending = signum
        self._retry_at = time.monotonic() + 1

    def logs(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - LOG_KEEP_BYTES))
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


def _oom_event(name: str, since: float) -> bool:
    probe = docker("events", "--since", f"{since - 5:.0f}", "--until", f"{time.time():.0f}", "--filter",
                   f"container={name}", "--filter", "event=oom", "--format", "{{.Action}}", check=False, timeout=30)
    return "oom" in probe.stdout


class DockerRuntime:
    """`ContainerRuntime` on the local Docker engine; every container carries the label `label`."""

    def __init__(self, api: FakeApiServer, *, workdir: Path, label: tuple[str, str]) -> None:
        self.api, self.workdir, self.label = api, workdir, label
        self.runs: dict[str, DockerProcess] = {}  # pod name → its container
        self._image_users: dict[str, str] = {}

    def pull(self, image: str) -> None:
        if image in self._image_users:
            return
        probe = docker("image", "inspect", "-f", "{{.Config.User}}", image, check=False, timeout=30)
        if probe.returncode != 0:  # no registry can be reached from here: absent means unpullable
            raise ImagePullError("ErrImagePull", f'image "{image}" is not in the Docker engine (run `make images`)')
        self._image_users[image] = probe.stdout.strip()

    def start(self, pod: dict[str, Any], container: dict[str, Any], argv: list[str], env: dict[str, str]) -> DockerProcess:
        pod_name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        env_file = self.workdir / f"{pod_name}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        env_file.chmod(0o600)
        name = f"{self.label[1]}-{pod_name}"
        run_argv = docker_run_argv(pod, container, argv, env_file=env_file,
                                   volume_root=self.workdir / "volumes" / pod_name, name=name,
                                   labels={self.label[0]: self.label[1]}, hosts=dns_names(self.api, ns),
                                   image_user=self._image_users.get(container["image"]))
        log_path = self.workdir / f"{pod_name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([docker_bin(), *run_argv], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.runs[pod_name] = DockerProcess(pod=pod_name, name=name, argv=run_argv, log_path=log_path, proc=proc)
        return self.runs[pod_name]

    def remove_all(self) -> None:
        """The node goes away: whatever still runs is removed."""
        for run in self.runs.values():
            if run.proc.poll() is None:
                docker("rm", "-f", run.name, check=False)
                try:
                    run.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    run.proc.kill()


class Cluster:
    """The control loop a cluster runs continuously: a Job controller pass, then a kubelet pass, every
    `poll_s` seconds, in a thread, until `stop()`. `errors` keeps passes that raised (tests fail on them).
    `seen` keeps the last state of every Job and Pod after each pass, also once deleted (the service
    deletes a superseded attempt's Job as soon as it has read its outcome: tests check it here)."""

    def __init__(self, api: FakeApiServer, runtime: DockerRuntime, *, secrets: dict[str, dict[str, str]],
                 poll_s: float = 0.5) -> None:
        self.api, self.runtime, self.poll_s = api, runtime, poll_s
        self.kubelet = Kubelet(api, runtime, secrets=secrets)
        self.errors: list[str] = []
        self.seen: dict[tuple[str, str], dict[str, Any]] = {}  # (jobs|pods, name) → last state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Cluster:
        self._thread = threading.Thread(target=self._loop, name="e2e-cluster", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.runtime.remove_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.api._lock:  # the pass and what it left, before any client can act on it
                    self.kubelet.run_until_settled(1)
                    for (resource, _, name), obj in self.api.objects.items():
                        if resource in ("jobs", "pods"):
                            self.seen[(resource, name)] = copy.deepcopy(obj)
            except Exception as exc:  # noqa: BLE001 (kept, and shown by the test that checks `errors`)
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
