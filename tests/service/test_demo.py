"""`make demo` as a newcomer runs it: `python -m service.dev.demo` end to end (real trainer, tiny model),
in a temporary working folder. It must end with the job's final phase, leave the pulled results on
disk, and leave no process or port behind."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from tests.service.conftest import REPO


def _processes_mentioning(text: str) -> list[str]:
    """This user's processes whose command line or environment names `text` (supervisors carry the
    run folder in their arguments, trainers in LATHE_WORK_DIR)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                data = (proc / part).read_bytes()
            except OSError:
                continue
            if text.encode() in data:
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
                break
    return found


def test_make_demo_runs_a_real_job_to_succeeded(tmp_path):
    workdir = (tmp_path / "demo").resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LYCORIS_KERNEL_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-m", "service.dev.demo", "--workdir", str(workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    match = re.fullmatch(r"lathe demo: job (j-\S+) final phase: succeeded", lines[-1])
    assert match, lines[-5:]
    assert "Traceback" not in out, out[-6000:]
    for expected in ("phase -> training", "phase -> succeeded", "metadata summary", "shrink report", "/10"):
        assert expected in proc.stdout, (expected, proc.stdout[-4000:])

    results = workdir / "results" / match.group(1)
    with safe_open(str(results / "lathe-demo.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        assert fh.metadata()["ss_steps"] == "10"
    assert any(k.startswith("lora_unet_") and k.endswith("lora_down.weight") for k in keys), keys[:10]
    with safe_open(str(results / "lathe-demo-shrunk.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).shape[0] for k in fh.keys() if k.endswith("lora_down.weight")} == {2}
    meta = json.loads((results / "metadata.json").read_text())
    assert meta["steps"] == 10 and meta["shrink_report"]["rank"] == 2
    assert {o["name"] for o in meta["outputs"]} >= {"lathe-demo.safetensors", "lathe-demo-shrunk.safetensors"}
    assert list(results.glob("samples/*/*.png"))

    # Shut down cleanly: no trainer or supervisor left, both ports closed.
    assert _processes_mentioning(str(workdir)) == []
    ports = re.search(r"API http://127\.0\.0\.1:(\d+)\s+S3 http://127\.0\.0\.1:(\d+)", proc.stdout)
    assert ports, proc.stdout[:2000]
    for port in map(int, ports.groups()):
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
