"""POST /v1/specs:convert: pasted text → a spec object the client can edit and submit.

A Lathe spec (JSON or TOML) is only parsed: its problems come back from POST /v1/jobs:validate, each
with its field path. An sd-scripts command line or `--config_file` TOML goes through the same
converter as `python -m trainer from-kohya`, with one difference that matters on a server: nothing
named in the text is read from the server's disk. A flag that would make the converter open a file
(`--dataset_config`, `--sample_prompts`, `--config_file`) is refused with a 422 naming it, and the
converter runs with local files off, so a path that slips past that check is noted, never read.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from service.api import errors
from service.api.wire import FieldProblem
from trainer.core import fromkohya

MAX_TEXT = 256 * 1024
# The flags whose value the command-line converter reads as a local file, and what to do instead.
FILE_FLAGS = {
    "dataset_config": "paste the dataset config's text into dataset.config_toml after converting",
    "sample_prompts": "put the prompt lines in sample.prompts after converting",
    "config_file": "paste the config file's text here instead of the command line",
}
# As a command-line flag (`--flag value`, `--flag=value`) or as a key of a pasted config TOML.
_FILE_FLAG_RE = re.compile(r"(?:--|^[ \t]*)(" + "|".join(FILE_FLAGS) + r")\b(?=\s*[=\s]|\s*$)", re.MULTILINE)


class SpecConvertRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, Meta(max_length=MAX_TEXT)]  # a spec (JSON/TOML) or an sd-scripts command line / config
    format: Literal["auto", "json", "toml", "kohya"] = "auto"


class SpecConversion(msgspec.Struct, kw_only=True):
    source: Literal["json", "toml", "kohya"]  # how the text was read
    spec: dict[str, Any]  # the spec object (submit it as JobCreate.spec; check it with jobs:validate)
    notes: list[str] = []  # sd-scripts flags not mapped, and why


def convert_text(body: SpecConvertRequest) -> SpecConversion:
    text = body.text
    fmt = body.format
    if fmt == "auto":
        fmt = _guess(text)
    if fmt == "json":
        return SpecConversion(source="json", spec=_unwrap(_parse(text, "json")))
    if fmt == "toml":
        return SpecConversion(source="toml", spec=_unwrap(_parse(text, "toml")))
    refused = sorted({m.group(1) for m in _FILE_FLAG_RE.finditer(text)})
    if refused:
        problems = [FieldProblem(path=f"--{flag}", message=f"the server does not read files named in pasted text; "
                                 f"{FILE_FLAGS[flag]} (or convert on your machine: lathe from-kohya FILE)")
                    for flag in refused]
        raise errors.InvalidSpec("--" + ", --".join(refused) + ": names a file on your machine, which the server "
                                 "does not read", problems=problems)
    spec, notes = fromkohya.convert(text, local_files=False)
    if spec is None:
        raise errors.InvalidSpec("no spec could be made from the sd-scripts text: " + "; ".join(notes[:3]),
                                 problems=[FieldProblem(path=_note_path(n), message=n) for n in notes])
    return SpecConversion(source="kohya", spec=msgspec.to_builtins(spec), notes=notes)


def _guess(text: str) -> Literal["json", "toml", "kohya"]:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return "json"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "kohya"
    # A Lathe spec has `version` and sections; an sd-scripts config has flag names as keys.
    return "toml" if "version" in doc or "model" in doc else "kohya"


def _parse(text: str, fmt: str) -> Any:
    try:
        return json.loads(text) if fmt == "json" else tomllib.loads(text)
    except (ValueError, RecursionError, tomllib.TOMLDecodeError) as exc:  # RecursionError: nested too deeply
        raise errors.InvalidSpec(f"not valid {fmt.upper()}: {exc}",
                                 problems=[FieldProblem(path="(root)", message=f"not valid {fmt.upper()}: {exc}")]) from None


def _unwrap(obj: Any) -> dict[str, Any]:
    """A pasted POST /v1/jobs body ({"spec": …}) reads as its spec."""
    if isinstance(obj, dict) and isinstance(obj.get("spec"), dict) and "version" not in obj:
        obj = obj["spec"]
    if not isinstance(obj, dict):
        raise errors.InvalidSpec("the spec must be an object",
                                 problems=[FieldProblem(path="(root)", message="the spec must be an object")])
    return obj


def _note_path(note: str) -> str:
    head = note.split(":", 1)[0]
    return head if head.startswith(("--", "$")) or "." in head else "(root)"
