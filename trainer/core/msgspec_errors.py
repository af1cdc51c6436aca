"""msgspec's validation messages split into the field path and what is wrong.

msgspec reports "Expected `int`, got `str` - at `$.training.steps`"; every caller that names the
field in its own error (the spec's problems, the API's request checks, the settings loaders) reads
the path the same way here.
"""

from __future__ import annotations

import re

# msgspec's location suffix " - at `$.a.b`" (also read when a message puts it as "in `$.a.b`").
_LOCATION = re.compile(r"\s*-?\s*(?:at|in) `\$(?P<path>[^`]*)`")


def split_validation_error(error: Exception | str) -> tuple[str, str]:
    """(path, message): "Expected `int`, got `str` - at `$.a.b[0]`" → ("a.b[0]", "Expected `int`, got `str`").

    The path is '' for the root or when msgspec gave none; dict keys stay as msgspec's `[...]`."""
    text = str(error)
    m = _LOCATION.search(text)
    path = m.group("path").lstrip(".") if m else ""
    return path, _LOCATION.sub("", text).strip().rstrip("-").strip()


def path_parts(path: str) -> list[str]:
    """'a.b[0]' → ['a', 'b', '[0]']: a '[...]' (index or msgspec's placeholder for a dict key) stays whole."""
    return re.findall(r"\[[^\]]*\]|[^.\[]+", path)
