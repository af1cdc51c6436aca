"""Typed settings from environment variables: one msgspec Struct field per variable.

The service's `Settings` and the trainer's `TrainerSettings` are read through `load_settings`, so
that every variable is parsed and reported the same way: an empty variable means "not set" (the
default applies), booleans are true/false/1/0/yes/no/on/off, lists are JSON, numbers are decimal,
and a bad value raises `SettingsError` naming the variable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from trainer.core.msgspec_errors import split_validation_error
T = TypeVar("T", bound=msgspec.Struct)


class SettingsError(ValueError):
    """A setting with a bad value: names the environment variable and what is expected."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def read_env(cls: type[msgspec.Struct], environ: Mapping[str, str], env_name: Callable[[str], str]) -> dict[str, Any]:
    """The values of `cls`'s fields set in `environ` (variable `env_name(field)`; empty = unset)."""
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        var = env_name(field.name)
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        values[field.name] = parse_value(var, raw, field.type)
    return values


def convert_settings(cls: type[T], values: dict[str, Any], env_name: Callable[[str], str]) -> T:
    """`values` as a `cls`; a value out of its field's bounds raises SettingsError naming the variable."""
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        field, _ = split_validation_error(exc)
        raise SettingsError(env_name(field) if field else "LATHE_*", str(exc)) from None


def load_settings(cls: type[T], environ: Mapping[str, str], env_name: Callable[[str], str]) -> T:
    return convert_settings(cls, read_env(cls, environ, env_name), env_name)


def parse_value(var: str, raw: str, annotation: Any) -> Any:
    """One variable's text for a field of type `annotation` (numbers are left to msgspec.convert)."""
    text = repr(annotation)
    if "list[" in text:
        try:
            value = json.loads(raw)
        except ValueError:
            raise SettingsError(var, f"expected a JSON list of strings, got {raw!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(var, f"expected a JSON list of strings, got {raw!r}")
        return value
    if "bool" in text:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(var, f"expected true or false, got {raw!r}")
    return raw.strip()  # msgspec.convert(strict=False) turns numeric strings into numbers
