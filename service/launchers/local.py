"""LocalLauncher: each attempt is a `python -m trainer run <spec_uri>` subprocess on this machine.

Per attempt, a run folder `<local_dir>/<tenant>/<job_id>-a<attempt>/` holds `pid` (the supervising
parent, service/launchers/supervise.py), `exit` (its exit code, written when the trainer ends) and
`trainer.log` (stdout + stderr). Trainers run in their own session, so they outlive a restart of the
service; a new LocalLauncher reads the same folder and sees them. Queueing, retries and lost-job
detection are the reconciler's (service/reconcile/reconciler.py): this class only starts, observes and stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from service.launchers.base import AttemptState, LaunchRequest, RunState
from service.launchers.supervise import CHILD_FILE, EXIT_FILE
from trainer.core.failures import reason_for_exit

_CODE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding service/ and trainer/
PID_FILE = "pid"
SERVICE_ONLY_ENV = frozenset({"LATHE_WEBHOOK_SECRET", "LATHE_TOKEN", "LATHE_TOKENS_FILE"})
LOG_FILE = "trainer.log"


class LocalLauncher:
    def __init__(self, local_dir: str | os.PathLike[str], command: list[str], *, cache_dir: str,
                 env: dict[str, str] | None = None, kill_after_s: float = 30.0,
                 python: str = sys.executable) -> None:
        """`command` is the trainer command without the spec URI (appended per attempt); `env`
        extends this process's environment (AWS_* settings pass through as they are)."""
        self.local_dir = Path(local_dir).resolve()
        self.command, self.cache_dir, self.env = list(command), str(Path(cache_dir).resolve()), dict(env or {})
        self.kill_after_s, self.python = kill_after_s, python
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # ours until reaped; survivors of a restart are not
        self._lock = threading.Lock()

    def run_dir(self, tenant: str, job_id: str, attempt: int) -> Path:
        return self.local_dir / tenant / f"{job_id}-a{attempt}"

    # -- Launcher protocol ---------------------------------------------------------------------
    def submit(self, request: LaunchRequest) -> None:
        run = self.run_dir(request.tenant, request.job_id, request.attempt)
        with self._lock:
            if (run / PID_FILE).exists():
                return  # this attempt was started already
            run.mkdir(parents=True, exist_ok=True)
            env = {
                # The service's own secrets stay here: a trainer parses untrusted datasets and needs none of them.
                **{k: v for k, v in os.environ.items() if k not in SERVICE_ONLY_ENV},
                "OMP_NUM_THREADS": "1",  # several trainers share this machine's cores
                "PYTHONUNBUFFERED": "1",
                "LATHE_JOB_ATTEMPT": str(request.attempt),
                "LATHE_CACHE_DIR": self.cache_dir,
                "LATHE_WORK_DIR": str(run / "work"),
                # The supervisor and the trainer import this checkout's packages, whatever the cwd.
                "PYTHONPATH": os.pathsep.join(p for p in (_CODE_ROOT, os.environ.get("PYTHONPATH", "")) if p),
                **self.env,
                **request.env,
            }
            argv = [self.python, "-m", "service.launchers.supervise", str(run), "--", *self.command, request.spec_uri]
            with open(run / LOG_FILE, "ab") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True, cwd=str(run))
            tmp = run / f".{PID_FILE}.tmp"
            tmp.write_text(f"{proc.pid}\n")
            os.replace(tmp, run / PID_FILE)
            self._children[str(run)] = proc
        # Reaped as soon as it ends, whether or not anyone asks for its state again (a finished attempt is
        # not polled any more): without a wait() it would stay a zombie until this process exits.
        threading.Thread(target=self._reap_when_done, args=(str(run), proc), name=f"lathe-reap-{request.job_id}",
                         daemon=True).start()

    def state(self, tenant: str, job_id: str, attempt: int) -> AttemptState:
        run = self.run_dir(tenant, job_id, attempt)
        self._reap()
        code = _read_int(run / EXIT_FILE)
        if code is not None:
            if code == 0:
                return AttemptState(state=RunState.SUCCEEDED, exit_code=0)
            reason = reason_for_exit(code)
            return AttemptState(state=RunState.FAILED, exit_code=code, reason=reason.value if reason else None,
                                message=f"trainer exited with code {code}")
        pid = _read_int(run / PID_FILE)
        if pid is None:
            return AttemptState(state=RunState.GONE, message="this machine never started the attempt")
        if _alive(pid, str(run)):
            return AttemptState(state=RunState.RUNNING)
        return AttemptState(state=RunState.GONE, message="the trainer process ended without recording an exit code "
                            "(killed, or the machine restarted)")

    def cancel(self, tenant: str, job_id: str, attempt: int) -> None:
        """SIGTERM to the attempt's process group (the trainer checkpoints and exits), SIGKILL after
        `kill_after_s` if it is still there. Returns at once."""
        run = self.run_dir(tenant, job_id, attempt)
        pid = _read_int(run / PID_FILE)
        if pid is None or not _alive(pid, str(run)):
            return
        _signal_group(pid, signal.SIGTERM)

        def kill_later() -> None:
            deadline = time.monotonic() + self.kill_after_s
            while time.monotonic() < deadline:
                if not _alive(pid, str(run)):
                    return
                time.sleep(0.2)
            child = _read_int(run / CHILD_FILE)
            if child is not None:
                try:
                    os.kill(child, signal.SIGKILL)  # the supervisor then records 137
                except (ProcessLookupError, PermissionError):
                    pass
                end = time.monotonic() + 5
                while time.monotonic() < end and _alive(pid, str(run)):
                    time.sleep(0.1)
            if _alive(pid, str(run)):
                _signal_group(pid, signal.SIGKILL)

        threading.Thread(target=kill_later, name=f"lathe-kill-{job_id}", daemon=True).start()

    def logs(self, tenant: str, job_id: str, attempt: int, tail_lines: int = 200) -> str:
        path = self.run_dir(tenant, job_id, attempt) / LOG_FILE
        try:
            with open(path, "rb") as fh:
                lines = deque(fh, maxlen=tail_lines)
        except FileNotFoundError:
            return ""
        return b"".join(lines).decode("utf-8", errors="replace")

    # -- housekeeping --------------------------------------------------------------------------
    def running(self) -> list[Path]:
        """Run folders of attempts whose process is alive (any LocalLauncher started them)."""
        out = []
        if not self.local_dir.exists():
            return out
        for pid_file in self.local_dir.glob(f"*/*/{PID_FILE}"):
            pid = _read_int(pid_file)
            if pid is not None and not (pid_file.parent / EXIT_FILE).exists() and _alive(pid, str(pid_file.parent)):
                out.append(pid_file.parent)
        return out

    def shutdown(self, *, kill: bool, timeout_s: float = 10.0) -> None:
        """Stop every attempt this machine runs (`kill`), or leave them running for the next service."""
        if not kill:
            return
        runs = self.running()
        pids = [(run, _read_int(run / PID_FILE)) for run in runs]
        for _, pid in pids:
            if pid:
                _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(pid and _alive(pid, str(run)) for run, pid in pids):
            time.sleep(0.1)
        for run, pid in pids:
            if pid and _alive(pid, str(run)):
                _signal_group(pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        with self._lock:
            for key, proc in list(self._children.items()):
                if proc.poll() is not None:
                    del self._children[key]

    def _reap_when_done(self, key: str, proc: subprocess.Popen[bytes]) -> None:
        proc.wait()
        with self._lock:
            if self._children.get(key) is proc:
                del self._children[key]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int, marker: str) -> bool:
    """The process exists and is ours: its command line names the run folder (pids get reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().decode("utf-8", errors="replace")
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[-1].split()[0]
    except OSError:
        return True  # no /proc (not Linux): trust the signal check
    # An empty command line: the process is still in exec (cannot be a reused pid of something else yet).
    return state != b"Z" and (not cmdline or marker in cmdline)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the supervisor leads its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass
