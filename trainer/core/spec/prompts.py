"""sd-scripts' sample prompt lines (`text --n negative --w 512 …`), read by `sample` and `grid`."""

from __future__ import annotations

import re
from typing import Any

from trainer.core.spec.problems import Problem


def parse_sample_prompt(line: str) -> dict[str, Any]:
    """sd-scripts' prompt line: `text --n negative --w 512 --h 512 --d seed --l cfg --s steps`."""
    parts = re.split(r"\s--(?=[nwhdls]\s)", " " + line.strip())
    out: dict[str, Any] = {"prompt": parts[0].strip(), "negative_prompt": "", "width": 512, "height": 512,
                           "seed": None, "scale": 7.5, "steps": 30}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        value = value.strip()
        try:
            if key == "n":
                out["negative_prompt"] = value
            elif key == "w":
                out["width"] = int(value)
            elif key == "h":
                out["height"] = int(value)
            elif key == "d":
                out["seed"] = int(value)
            elif key == "l":
                out["scale"] = float(value)
            elif key == "s":
                out["steps"] = int(value)
        except ValueError:
            raise ValueError(f"option --{key} expects a number, got {value!r}") from None
    return out


def prompt_problems(where: str, prompts: list[str]) -> list[Problem]:
    """A problem at `<where>[i]` for each line that does not parse or asks for an unusable size."""
    problems = []
    for i, line in enumerate(prompts):
        try:
            parsed = parse_sample_prompt(line)
        except ValueError as exc:
            problems.append(Problem(f"{where}[{i}]", str(exc)))
            continue
        if not parsed["prompt"]:
            problems.append(Problem(f"{where}[{i}]", "empty prompt"))
        if parsed["width"] % 8 or parsed["height"] % 8 or not (64 <= parsed["width"] <= 4096) or \
                not (64 <= parsed["height"] <= 4096):
            problems.append(Problem(f"{where}[{i}]", "--w/--h must be multiples of 8 between 64 and 4096"))
    return problems
