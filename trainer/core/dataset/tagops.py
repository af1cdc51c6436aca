"""Tag operations on caption files, as pure functions: add, remove, replace, prepend a trigger
word, drop rare tags, deduplicate tags within a caption; and which caption files have no image.

A caption is comma-separated tags (the booru / WD14 style sd-scripts shuffles and counts).
Tags are compared stripped and case-insensitively, as `ss_tag_frequency` counts them; what is kept
keeps its own spelling. Every line of a multi-line caption (wildcard captions) is edited alike.
Torch-free: `lathe tags` and the trainer use the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal


def split_tags(line: str) -> list[str]:
    return [t.strip() for t in line.split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def _key(tag: str) -> str:
    return tag.strip().lower()


def add_tags(tags: list[str], new: list[str], *, first: bool = False) -> list[str]:
    """`new` tags not already present, at the end (or the front)."""
    have = {_key(t) for t in tags}
    extra = [t for t in dict.fromkeys(n.strip() for n in new) if t and _key(t) not in have]
    return extra + tags if first else tags + extra


def remove_tags(tags: list[str], unwanted: Iterable[str]) -> list[str]:
    drop = {_key(t) for t in unwanted}
    return [t for t in tags if _key(t) not in drop]


def replace_tag(tags: list[str], old: str, new: str) -> list[str]:
    """Every `old` becomes `new` in place (a duplicate that results is dropped: the first stays)."""
    out = [new.strip() if _key(t) == _key(old) else t for t in tags]
    return dedupe_tags(out)


def prepend_trigger(tags: list[str], trigger: str) -> list[str]:
    """`trigger` as the first tag (moved there when present): what `keep_tokens = 1` then keeps."""
    return [trigger.strip()] + remove_tags(tags, [trigger])


def dedupe_tags(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in tags:
        if _key(t) not in seen:
            seen.add(_key(t))
            out.append(t)
    return out


def frequencies(captions: Mapping[str, str]) -> dict[str, int]:
    """In how many captions each tag appears (lower-cased), over the whole dataset."""
    counts: dict[str, int] = {}
    for text in captions.values():
        for key in {_key(t) for line in text.splitlines() for t in split_tags(line)}:
            counts[key] = counts.get(key, 0) + 1
    return counts


OpName = Literal["add", "remove", "replace", "trigger", "min_count", "dedupe"]


@dataclass(frozen=True)
class TagOp:
    """One operation: `add` tags (`first` puts them in front), `remove` tags, `replace` old → new,
    `trigger` word first, drop tags in fewer than `min_count` captions, `dedupe` within a caption."""

    op: OpName
    tags: tuple[str, ...] = ()
    new: str = ""
    first: bool = False
    min_count: int = 0


def apply_ops(captions: Mapping[str, str], ops: Iterable[TagOp]) -> dict[str, str]:
    """Captions (path → text) after `ops`, in order. Frequencies for `min_count` are taken from the
    captions as they stand when that operation runs."""
    out = dict(captions)
    for op in ops:
        if op.op == "min_count":
            counts = frequencies(out)
            rare = {t for t, n in counts.items() if n < op.min_count}
            out = {p: _each_line(text, lambda tags: remove_tags(tags, rare)) for p, text in out.items()}
        else:
            out = {p: _each_line(text, _edit(op)) for p, text in out.items()}
    return out


def _edit(op: TagOp):
    if op.op == "add":
        return lambda tags: add_tags(tags, list(op.tags), first=op.first)
    if op.op == "remove":
        return lambda tags: remove_tags(tags, op.tags)
    if op.op == "replace":
        return lambda tags: replace_tag(tags, op.tags[0], op.new)
    if op.op == "trigger":
        return lambda tags: prepend_trigger(tags, op.tags[0])
    if op.op == "dedupe":
        return dedupe_tags
    raise ValueError(f"unknown tag operation {op.op!r}")


def _each_line(text: str, edit) -> str:
    lines = text.splitlines() or [""]
    return "\n".join(join_tags(edit(split_tags(line))) for line in lines)


def orphan_captions(files: Iterable[str], caption_extension: str, image_extensions: Iterable[str]) -> list[str]:
    """Caption files with no image of the same stem in the same folder (the guides' clean-up)."""
    ext = caption_extension.lower()
    exts = tuple(e.lower() for e in image_extensions)
    stems = {f.rsplit(".", 1)[0] for f in files if f.lower().endswith(exts)}
    return sorted(f for f in files if f.lower().endswith(ext) and f[: -len(ext)] not in stems)
