"""`python -m service.launchers.supervise RUN_DIR -- COMMAND…`: run one trainer attempt and record its exit code.

The LocalLauncher starts trainers through this small parent so that the exit code survives a restart
of the service: it lands in RUN_DIR/exit, which any later LocalLauncher reads. The trainer runs in
the same process group; a SIGTERM to the group reaches the trainer (which checkpoints and exits) while
this parent waits for it instead of dying first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

EXIT_FILE = "exit"
CHILD_FILE = "child"  # the trainer's pid, so a stuck trainer can be killed while this parent records it


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m service.launchers.supervise RUN_DIR -- COMMAND [ARGS…]", file=sys.stderr)
        return 2
    run_dir, command = Path(argv[0]), argv[2:]
    child = subprocess.Popen(command)
    (run_dir / CHILD_FILE).write_text(f"{child.pid}\n")
    # The group's SIGTERM/SIGINT is meant for the trainer; this parent only waits and records.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    code = child.wait()
    if code < 0:  # killed by a signal: the shell convention, as Kubernetes reports it
        code = 128 - code
    tmp = run_dir / f".{EXIT_FILE}.tmp"
    tmp.write_text(f"{code}\n")
    os.replace(tmp, run_dir / EXIT_FILE)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
