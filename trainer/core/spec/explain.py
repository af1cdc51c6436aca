"""msgspec's validation errors as Problems: the field path, and the allowed fields or values there."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Struct

from trainer.core.msgspec_errors import path_parts, split_validation_error
from trainer.core.spec.jobspec import JobSpec
from trainer.core.spec.problems import Problem

# Options of sd-scripts that a multi-tenant service refuses or that moved; the message says why.
_REFUSED_OPTIONS = {
    "lr_scheduler_type": "loads an arbitrary Python class by name, which a multi-tenant service refuses; "
    "use scheduler.type = 'cosine_annealing_warm_restarts' (built in) or one of the standard schedulers",
    "lr_scheduler_args": "belongs to lr_scheduler_type, which is refused; use the scheduler.* fields",
    "optimizer_type": "is called optimizer.type here",
    "network_dim": "is called network.dim here",
    "network_alpha": "is called network.alpha here",
    "network_module": "is called network.module here",
    "pretrained_model_name_or_path": "is called model.uri here",
    "train_data_dir": "is called dataset.uri here",
}


def _field_names(struct_type: type) -> list[str]:
    return list(struct_type.__struct_fields__)


def _resolve_path(path: list[str]) -> Any:
    """The annotation at a field path inside JobSpec (for listing allowed values)."""
    tp: Any = JobSpec
    for part in path:
        if part.startswith("["):
            args = [a for a in get_args(tp) if a is not type(None)]
            tp = args[0] if args else tp
            while get_origin(tp) is Annotated:  # list fields with a length bound: Annotated[list[X], Meta]
                tp = get_args(tp)[0]
            tp = get_args(tp)[-1] if get_args(tp) else tp  # the item (list) or value (dict) type
            continue
        hints = msgspec.structs.fields(tp) if isinstance(tp, type) and issubclass(tp, Struct) else None
        if hints is None:
            # unwrap Optional / Annotated
            for arg in get_args(tp):
                if isinstance(arg, type) and issubclass(arg, Struct):
                    tp = arg
                    break
            else:
                return None
            hints = msgspec.structs.fields(tp)
        match = [f for f in hints if f.name == part]
        if not match:
            return None
        tp = match[0].type
    return tp


def _literal_values(tp: Any) -> list[Any]:
    values: list[Any] = []
    origin_args = get_args(tp)
    if getattr(tp, "__origin__", None) is Literal:
        return list(origin_args)
    for arg in origin_args:
        values.extend(_literal_values(arg))
    return values




def join_path(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[") or "(root)"


def unknown_field(parts: list[str], name: str) -> Problem:
    parent = _resolve_path(parts)
    allowed = _field_names(parent) if isinstance(parent, type) and issubclass(parent, Struct) else []
    if name in _REFUSED_OPTIONS:
        return Problem(join_path([*parts, name]), f"unknown field: '{name}' {_REFUSED_OPTIONS[name]}")
    return Problem(join_path([*parts, name]), f"unknown field '{name}'; allowed fields here: {', '.join(allowed)}")


def missing_field(parts: list[str], name: str) -> Problem:
    return Problem(join_path([*parts, name]), f"required field '{name}' is missing")


def explain_validation(exc: msgspec.ValidationError, base: list[str] | None = None) -> Problem:
    """msgspec's error for a value converted at field path `base` (its own path is relative to it)."""
    path, message = split_validation_error(exc)
    parts = [*(base or []), *path_parts(path)]
    unknown = re.match(r"Object contains unknown field `(?P<f>[^`]+)`", message)
    if unknown:
        return unknown_field(parts, unknown.group("f"))
    missing = re.match(r"Object missing required field `(?P<f>[^`]+)`", message)
    if missing:
        return missing_field(parts, missing.group("f"))
    allowed = _literal_values(_resolve_path(parts)) if parts else []
    if allowed:
        message += f"; allowed values: {', '.join(map(repr, allowed))}"
    return Problem(join_path(parts), message)
