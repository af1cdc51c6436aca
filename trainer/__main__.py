"""`python -m trainer <command>`: the trainer's command line.

Each command lives in its own module and is imported only when chosen, so `shrink`, `inspect` and
`from-kohya` start fast (no diffusers/transformers import) and `run` pays for torch only when used.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("trainer.job.run", "run a job: python -m trainer run SPEC (local path or s3:// URI of spec.json)"),
    "launch": ("trainer.job.launch", "run `accelerate launch … -m trainer run` and exit with the trainer's code"),
    "shrink": ("trainer.shrink.cli", "SVD rank reduction of an adapter file"),
    "merge": ("trainer.models.merge", "merge adapters into a base checkpoint (single file or diffusers folder)"),
    "inspect": ("trainer.tools.inspect", "metadata and key summary of an adapter file, as JSON"),
    "tiny-model": ("trainer.models.tiny", "write a tiny random SD1.5/SD2/SDXL pipeline (offline)"),
    "tiny-dataset": ("trainer.tools.tinydata", "write a tiny generated dataset in sd-scripts folder layout"),
    "from-kohya": ("trainer.core.fromkohya", "convert an sd-scripts command line or config into a JobSpec"),
    "tag": ("trainer.caption.captioning", "tag a dataset's images with a WD14-format ONNX tagger into a new version"),
}


def _usage() -> str:
    lines = ["usage: python -m trainer <command> [args]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
