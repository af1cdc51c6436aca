"""A `docker` CLI stand-in for the runtime tests of `make test` (no engine): the calls DockerRuntime
makes, with their exit codes, on a folder of state ($FAKE_DOCKER_DIR).

- `image inspect -f … IMAGE`: prints the USER of an image listed in `images.json` ({image: user}),
  else exits 1 as the engine does for a missing image;
- `run … --name NAME …`: records its arguments in NAME.argv (JSON), prints a line, then runs until a
  signal arrives (TERM: exits `$FAKE_DOCKER_SIGTERM_EXIT`, 20 by default as the trainer does, ignored
  when empty; KILL:
  exits 137, as `docker run` does for a SIGKILLed container) or until the test writes NAME.exit;
- `kill [--signal SIG] NAME`: delivers SIG (KILL by default) to a running NAME, exits 1 when no such
  container runs; `rm -f NAME` is a KILL;
- `events … --filter container=NAME …`: prints `oom` when NAME.oom exists.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_DOCKER_DIR"])


def _opt(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _running(name: str) -> bool:
    return (STATE / f"{name}.argv").exists() and not (STATE / f"{name}.done").exists()


def main(args: list[str]) -> int:
    if args[:2] == ["image", "inspect"]:
        images = json.loads((STATE / "images.json").read_text())
        if args[-1] not in images:
            print(f"Error: No such image: {args[-1]}", file=sys.stderr)
            return 1
        print(images[args[-1]])
        return 0
    if args[0] == "run":
        name = _opt(args, "--name") or "unnamed"
        (STATE / f"{name}.argv").write_text(json.dumps(args))
        print(f"{name}: started", flush=True)
        try:
            while True:
                if (STATE / f"{name}.exit").exists():
                    return int((STATE / f"{name}.exit").read_text())
                sent = (STATE / f"{name}.signal").read_text().strip() if (STATE / f"{name}.signal").exists() else ""
                if sent == "KILL":
                    return 137
                if sent == "TERM" and os.environ.get("FAKE_DOCKER_SIGTERM_EXIT", "20"):
                    return int(os.environ.get("FAKE_DOCKER_SIGTERM_EXIT", "20"))
                time.sleep(0.02)
        finally:
            (STATE / f"{name}.done").touch()
    if args[0] in ("kill", "rm"):
        name = args[-1]
        if not _running(name):
            print(f"Error response from daemon: No such container: {name}", file=sys.stderr)
            return 1
        (STATE / f"{name}.signal").write_text(_opt(args, "--signal") or "KILL")
        return 0
    if args[0] == "events":
        name = next(a.split("=", 1)[1] for a in args if a.startswith("container="))
        if (STATE / f"{name}.oom").exists():
            print("oom")
        return 0
    print(f"fake docker: unsupported call {args}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
