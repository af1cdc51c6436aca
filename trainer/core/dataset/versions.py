"""A new version of a dataset: a copy under another URI with its caption files rewritten (tag
operations, captioning), never an edit in place. The destination must be empty and must not
overlap the source; files are copied as they are except the caption files the caller replaces.
Torch-free: `lathe tags` runs it against a URI through the storage code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from trainer.core.failures import JobFailure, Reason
from trainer.core.storage import Store, open_store
from trainer.core.storage import parse_uri

MAX_CAPTION_BYTES = 1024 * 1024


@dataclass(frozen=True)
class VersionResult:
    copied: int
    captions_written: int
    removed: list[str]


def check_destination(src_uri: str, dest_uri: str) -> None:
    """Refuses a destination that is the source, inside it or around it."""
    src, dest = parse_uri(src_uri), parse_uri(dest_uri)
    if dest.is_under(src) or src.is_under(dest):
        raise JobFailure(Reason.SPEC_INVALID, f"the new dataset version {dest_uri} overlaps the source {src_uri}: "
                         "datasets are never edited in place; give an output URI outside it")


def write_version(src_uri: str, dest_uri: str, rewrite: Callable[[Mapping[str, str]], Mapping[str, str | None]],
                  *, caption_extension: str, opener: Callable[[str], Store] = open_store) -> VersionResult:
    """Copies `src_uri` (a folder) to `dest_uri` with the caption files `rewrite` returns: it gets
    {caption path: text} of the source and returns the captions to write (None deletes one; new
    paths add caption files). Raises JobFailure naming the URI when the destination is not empty."""
    check_destination(src_uri, dest_uri)
    src = opener(src_uri.rstrip("/") + "/")
    dest = opener(dest_uri.rstrip("/") + "/")
    if next(iter(dest.list("", limit=1)), None) is not None:
        raise JobFailure(Reason.SPEC_INVALID, f"{dest_uri} is not empty: a new dataset version goes to an empty "
                         "location (nothing is overwritten)")
    names = [o.key for o in src.list("") if not o.key.endswith("/")]
    if not names:
        raise JobFailure(Reason.DATASET_INVALID, f"nothing found under {src_uri}")
    ext = caption_extension.lower()
    captions = {n: src.get_bytes(n).decode("utf-8", errors="replace") for n in names if n.lower().endswith(ext)}
    new = rewrite(captions)
    removed = sorted(p for p, t in new.items() if t is None)
    copied = 0
    for name in names:
        if name in new:
            continue
        dest.put_bytes(name, src.get_bytes(name), if_none_match=True)
        copied += 1
    written = 0
    for path, text in new.items():
        if text is not None:
            data = text.encode("utf-8")
            if len(data) > MAX_CAPTION_BYTES:
                raise JobFailure(Reason.DATASET_INVALID, f"{path}: caption over {MAX_CAPTION_BYTES} bytes")
            dest.put_bytes(path, data, content_type="text/plain; charset=utf-8", if_none_match=True)
            written += 1
    return VersionResult(copied, written, removed)
