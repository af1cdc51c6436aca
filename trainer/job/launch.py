"""`python -m trainer launch -- accelerate launch … -m trainer run SPEC`: exit with the trainer's own code.

`accelerate launch` (torchrun underneath) exits 1 when a rank fails, and 143 after a SIGTERM, whatever
the trainer's exit code was; Kubernetes' podFailurePolicy and the service read that code (10 spec,
11 dataset…). This parent runs the launcher command, forwards SIGTERM/SIGINT to it (it is PID 1 in the
container: the kubelet signals only that process), and exits with the most telling code the ranks
recorded: every `trainer run` rank writes its code to `$LATHE_EXIT_DIR/rank-<RANK>`. With no record
(a rank killed outright), the launcher's own code stands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.core.failures import EXIT_CODES, FINAL_EXIT_CODES, Reason
from trainer.core.settings import trainer_settings

EXIT_DIR_ENV = "LATHE_EXIT_DIR"
# Which rank code explains an attempt best: a final one (no retry helps), then the object store, then
# a preemption; a rank that only saw its peers vanish reports `internal`.
_PRIORITY = [*FINAL_EXIT_CODES, EXIT_CODES[Reason.STORAGE_ERROR], EXIT_CODES[Reason.PREEMPTED],
             EXIT_CODES[Reason.INTERNAL]]


def record_exit(code: int) -> None:
    """Called by each `trainer run` rank on its way out (a no-op outside `trainer launch`)."""
    folder = trainer_settings().exit_dir
    if folder:
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(f"{code}\n")


def pick(rank_codes: list[int], launcher_code: int) -> int:
    failed = [c for c in rank_codes if c != 0]
    if not failed:
        return launcher_code
    return min(failed, key=lambda c: (_PRIORITY.index(c) if c in _PRIORITY else len(_PRIORITY)))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--":
        print("usage: python -m trainer launch -- COMMAND [ARGS…]  (e.g. accelerate launch … -m trainer run SPEC)",
              file=sys.stderr)
        return 2
    exit_dir = tempfile.mkdtemp(prefix="lathe-exit-")
    child = subprocess.Popen(argv[1:], env={**os.environ, EXIT_DIR_ENV: exit_dir})

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    codes = []
    for path in sorted(Path(exit_dir).glob("rank-*")):
        try:
            codes.append(int(path.read_text().strip()))
        except ValueError:
            continue
    final = pick(codes, code if code >= 0 else 128 - code)  # killed by signal n: 128 + n, as a shell says
    print(f"trainer launch: ranks exited {codes or 'without a record'}, launcher {code}; exiting {final}",
          file=sys.stderr)
    return final
