"""What the checks report: a Problem names a field path and what to do; SpecError carries them."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class Problem(Struct, frozen=True):
    path: str  # dotted field path, e.g. "network.block_dims"
    message: str  # what is wrong and what to do
    severity: Literal["error", "warning"] = "error"


class SpecError(ValueError):
    """An invalid spec; `problems` name each field path and what to do."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))



class Found(list):
    """A section checker's problems in the order found; `err` / `warn` add one for a field path."""

    def err(self, path: str, message: str) -> None:
        self.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.append(Problem(path, message, "warning"))
