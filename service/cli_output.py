"""How `lathe` prints: results on stdout (a job id alone, so scripts can capture it; `--json` for whole
records), messages and errors on stderr, progress as a one-line bar.
"""

from __future__ import annotations

import json
import sys
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def err(message: str) -> None:
    print(message, file=sys.stderr)


def print_validation(result: dict[str, Any]) -> None:
    pre = result.get("preflight") or {}
    print(f"ok: {pre.get('images', 0)} images, {pre.get('steps_per_epoch', 0)} steps/epoch, "
          f"{pre.get('total_steps', 0)} steps in {pre.get('epochs', 0)} epoch(s)")
    for w in result.get("warnings", []):
        print(f"warning: {w['path']}: {w['message']}")


def bar(progress: dict[str, Any], width: int = 30) -> str:
    step, total = progress.get("step") or 0, progress.get("total_steps") or 0
    filled = int(width * step / total) if total else 0
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("eta_s") is not None:
        parts.append(f"eta {duration(progress['eta_s'])}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def status_line(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['phase']:<10} {bar(job.get('progress') or {})}"
    if job.get("error"):
        line += f"  error {job['error']['reason']}: {job['error']['message']}"
    return line
