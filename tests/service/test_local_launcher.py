"""The LocalLauncher alone, with tiny commands instead of a trainer: exit codes to reasons, logs,
cancel (SIGTERM, then SIGKILL), idempotent submit, and a second launcher seeing the first's runs."""

from __future__ import annotations

import sys

from service.launchers.base import Launcher, LaunchRequest, RunState
from service.launchers.local import LocalLauncher
from tests.service.conftest import wait_for
from trainer.core.spec import spec_from_obj

SPEC = spec_from_obj({"version": 1, "model": {"uri": "s3://b/m"}, "dataset": {"uri": "s3://b/d"}})


def request(job_id: str, attempt: int = 1) -> LaunchRequest:
    return LaunchRequest(job_id=job_id, tenant="acme", attempt=attempt, spec_uri=f"s3://b/{job_id}/spec.json", spec=SPEC)


def launcher(tmp_path, code: str, kill_after_s: float = 10.0) -> LocalLauncher:
    return LocalLauncher(tmp_path / "runs", [sys.executable, "-c", code], cache_dir=str(tmp_path / "cache"),
                         kill_after_s=kill_after_s)


def test_exit_codes_map_to_reasons_and_logs_are_kept(tmp_path):
    code = "import os, sys; print('attempt', os.environ['LATHE_JOB_ATTEMPT'], sys.argv[1]); sys.exit(20)"
    local = launcher(tmp_path, code)
    assert isinstance(local, Launcher)
    local.submit(request("j-1"))
    local.submit(request("j-1"))  # idempotent: one process
    state = wait_for(lambda: (s := local.state("acme", "j-1", 1)).state != RunState.RUNNING and s, 20)
    assert state.state == RunState.FAILED and state.exit_code == 20 and state.reason == "preempted"
    assert local.logs("acme", "j-1", 1).strip() == "attempt 1 s3://b/j-1/spec.json"
    assert local.state("acme", "j-1", 2).state == RunState.GONE


def test_cancel_terms_then_kills_and_a_new_launcher_sees_the_run(tmp_path):
    code = ("import signal, time, sys\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('checkpointing', flush=True), sys.exit(22)))\n"
            "print('started', flush=True)\n"
            "time.sleep(60)\n")
    local = launcher(tmp_path, code)
    local.submit(request("j-2"))
    wait_for(lambda: "started" in local.logs("acme", "j-2", 1), 20)
    again = launcher(tmp_path, code)  # e.g. after a service restart
    assert again.state("acme", "j-2", 1).state == RunState.RUNNING
    again.cancel("acme", "j-2", 1)
    state = wait_for(lambda: (s := again.state("acme", "j-2", 1)).state != RunState.RUNNING and s, 20)
    assert state.state == RunState.FAILED and state.reason == "cancelled"
    assert "checkpointing" in again.logs("acme", "j-2", 1)

    stubborn = launcher(tmp_path, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                  "print('up', flush=True); time.sleep(60)", kill_after_s=1.0)
    stubborn.submit(request("j-3"))
    wait_for(lambda: "up" in stubborn.logs("acme", "j-3", 1), 20)
    stubborn.cancel("acme", "j-3", 1)
    state = wait_for(lambda: (s := stubborn.state("acme", "j-3", 1)).state != RunState.RUNNING and s, 20)
    assert state.exit_code == 137 and state.state == RunState.FAILED  # SIGKILL after kill_after_s


def _zombie_or_alive(pid: int) -> str | None:
    """The process state letter from /proc (Z for a zombie), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0].decode()
    except FileNotFoundError:
        return None


def test_a_finished_attempt_is_reaped_without_being_polled(tmp_path):
    local = launcher(tmp_path, "print('done')")
    local.submit(request("j-4"))
    pid = int((local.run_dir("acme", "j-4", 1) / "pid").read_text())
    # Nobody asks for the attempt's state: the launcher reaps its process by itself.
    wait_for(lambda: (local.run_dir("acme", "j-4", 1) / "exit").exists(), 20)
    wait_for(lambda: _zombie_or_alive(pid) is None, 10, what=f"pid {pid} reaped (state {_zombie_or_alive(pid)})")
    assert local.state("acme", "j-4", 1).state == RunState.SUCCEEDED
