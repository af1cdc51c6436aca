"""JSON / TOML → a checked JobSpec, and the canonical encoding that is stored and hashed."""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Struct

from trainer.core.spec.check import check_spec
from trainer.core.spec.common import SUPPORTED_VERSIONS
from trainer.core.spec.explain import (
    explain_validation,
    join_path,
    missing_field,
    unknown_field,
)
from trainer.core.spec.jobspec import JobSpec
from trainer.core.spec.problems import Problem, SpecError


def spec_from_obj(obj: Any) -> JobSpec:
    """Validate a decoded JSON/TOML object as a JobSpec (types, ranges, cross-field rules). The
    SpecError lists every problem found: each bad field, not only the first."""
    if not isinstance(obj, dict):
        raise SpecError([Problem("(root)", "a job spec is an object (JSON) or a table (TOML)")])
    version = obj.get("version")
    if version is None:
        raise SpecError([Problem("version", f"required field 'version' is missing; supported: {list(SUPPORTED_VERSIONS)}")])
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise SpecError([
            Problem("version", f"unsupported spec version {version!r}; supported versions: {list(SUPPORTED_VERSIONS)}")
        ])
    clean, unsafe = _without_unsafe_values(obj)
    bad = [p.path for p in unsafe]
    problems = unsafe[:MAX_UNSAFE_REPORTED] + [
        p for p in _struct_problems(clean, JobSpec, []) if not any(_is_under(p.path, u) for u in bad)
    ]
    if problems:
        raise SpecError(problems)
    try:
        spec = msgspec.convert(obj, JobSpec, strict=True)
    except msgspec.ValidationError as exc:  # a rule the field-by-field pass does not see; never expected
        raise SpecError([explain_validation(exc)]) from None
    _apply_implied_options(spec)
    errors = [p for p in check_spec(spec) if p.severity == "error"]
    if errors:
        raise SpecError(errors)
    return spec


# One bad value must not hide the next: msgspec stops at the first error, so the object is checked field
# by field against the Structs' own annotations (each type and bound stays written once, on its field).


def _struct_problems(obj: dict[str, Any], struct: type, parts: list[str]) -> list[Problem]:
    """Every unknown field, missing required field and bad value of `obj` read as `struct`."""
    out: list[Problem] = []
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    for key, value in obj.items():
        if key not in fields:
            out.append(unknown_field(parts, str(key)))
        else:
            out += _value_problems(value, fields[key].type, [*parts, key])
    out += [missing_field(parts, f.encode_name) for f in fields.values() if f.required and f.encode_name not in obj]
    return out


def _value_problems(value: Any, tp: Any, parts: list[str]) -> list[Problem]:
    try:
        msgspec.convert(value, tp, strict=True)
        return []
    except msgspec.ValidationError as exc:
        first = explain_validation(exc, parts)
    if first.path == join_path(parts):
        return [first]  # the value as a whole is wrong (its type, a list's length): nothing finer to say
    kind, inner = _container_for(tp, value)
    found: list[Problem] = []
    if kind == "struct":
        found = _struct_problems(value, inner, parts)
    elif kind == "list":
        found = [p for i, item in enumerate(value) for p in _value_problems(item, inner, [*parts, f"[{i}]"])]
    elif kind == "dict":
        found = [p for key, item in value.items() for p in _value_problems(item, inner, [*parts, str(key)])]
    return found or [first]


def _container_for(tp: Any, value: Any) -> tuple[str | None, Any]:
    """How to look inside `value` read as `tp`: ("struct", S), ("list", item type), ("dict", value
    type) or (None, None), through Annotated and unions (the arm that fits the value's JSON kind)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, Struct):
        return ("struct", tp) if isinstance(value, dict) else (None, None)
    origin = get_origin(tp)
    if origin is list:
        return ("list", get_args(tp)[0]) if isinstance(value, list) else (None, None)
    if origin is dict:
        return ("dict", get_args(tp)[1]) if isinstance(value, dict) else (None, None)
    for arm in get_args(tp):  # a union
        found = _container_for(arm, value)
        if found[0] is not None:
            return found
    return None, None


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith((root + ".", root + "["))


MAX_SPEC_DEPTH = 16  # a real spec nests 4 levels (optimizer.args.<key>[i]); JSON allows ~1000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_UNSAFE_REPORTED = 20


def _without_unsafe_values(obj: Any) -> tuple[Any, list[Problem]]:
    """A copy of `obj` with every value no field can hold replaced by 0, and a problem for each:
    NaN/infinity (JSON as Python reads it and TOML both allow them), integers outside 64 bits (they
    pass `int` fields but overflow torch.manual_seed and friends in the trainer: an `internal`
    failure, retried) and nesting deeper than any field (msgspec and a recursive walk would hit the
    interpreter's recursion limit: a 500). The copy lets the field checks look at everything else.
    Iterative on purpose."""
    problems: list[Problem] = []
    root: list[Any] = [None]
    stack: list[tuple[Any, str, int, Any, Any]] = [(obj, "", 0, root, 0)]
    while stack:
        value, path, depth, parent, slot = stack.pop()
        where = path or "(root)"
        problem = None
        if depth > MAX_SPEC_DEPTH:
            problem = f"nested more than {MAX_SPEC_DEPTH} levels deep; no spec field nests like that"
        elif isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number (not NaN or infinity)"
        elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            problem = "is out of range: integers must fit in 64 bits (|n| < 9.2e18)"
        if problem is not None:
            problems.append(Problem(where, problem))
            parent[slot] = 0
        elif isinstance(value, dict):
            parent[slot] = copy = dict.fromkeys(value)
            stack.extend((item, f"{path}.{key}" if path else str(key), depth + 1, copy, key)
                         for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            parent[slot] = copy = [None] * len(value)
            stack.extend((item, f"{path}[{i}]", depth + 1, copy, i) for i, item in reversed(list(enumerate(value))))
        else:
            parent[slot] = value
    return root[0], problems


def _apply_implied_options(spec: JobSpec) -> None:
    """Options that imply others in sd-scripts: `--cache_latents_to_disk` turns on `--cache_latents`, and
    `--cache_text_encoder_outputs_to_disk` turns on `--cache_text_encoder_outputs`. Set them here so every
    consumer of the spec sees the same, complete picture."""
    prec = spec.precision
    if prec.cache_latents_to_disk:
        prec.cache_latents = True
    if prec.cache_text_encoder_outputs_to_disk:
        prec.cache_text_encoder_outputs = True


def decode_spec(data: bytes | str, *, format: Literal["json", "toml", "auto"] = "auto") -> JobSpec:
    """JSON or TOML bytes → a checked JobSpec, or SpecError naming the field paths."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError([Problem("(root)", "the spec is not UTF-8 text")]) from None
    else:
        text = data
    if format == "auto":
        format = "json" if text.lstrip().startswith("{") else "toml"
    try:
        obj = json.loads(text) if format == "json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SpecError([Problem("(root)", f"not valid {format.upper()}: {exc}")]) from None
    return spec_from_obj(obj)



def encode_spec(spec: JobSpec) -> bytes:
    """Canonical JSON (sorted keys), the form stored as spec.json and hashed."""
    return msgspec.json.format(msgspec.json.encode(spec, order="sorted"), indent=2)


def spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(msgspec.json.encode(spec, order="sorted")).hexdigest()
