"""docs/architecture.md is the map of the code: every module of `trainer/` and `service/` is named in
it, under its folder's heading, so the map cannot fall behind the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _listed() -> set[str]:
    listed, folder = set(), None
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        heading = re.match(r"### .* — `([\w/]+)/`$", line)
        if heading:
            folder = heading.group(1)
        row = re.match(r"\| `([\w.]+\.py)` \|", line)
        if row and folder:
            listed.add(f"{folder}/{row.group(1)}")
    return listed


def test_every_module_is_on_the_map() -> None:
    tops = {"trainer/__init__.py", "service/__init__.py"}  # the packages' own docstrings, not modules
    modules = {str(p.relative_to(ROOT)) for top in ("trainer", "service") for p in (ROOT / top).rglob("*.py")
               if "__pycache__" not in p.parts} - tops
    listed = _listed()
    assert listed, "no module table found in docs/architecture.md"
    assert modules - listed == set(), "modules missing from docs/architecture.md"
    assert listed - modules == set(), "docs/architecture.md names modules that do not exist"
