"""Which names and archive members a dataset may hold: the preflight (reading an archive through ranged
GETs, or a listing) and the trainer's extraction refuse the same ones.

A name is refused when it is absolute (also `C:`), holds a NUL, or climbs out with `..`; an archive
member when it is a link (symbolic or hard) or a device, FIFO or other special file. macOS debris
(`__MACOSX/`, `._*`, `.DS_Store`) is skipped by both before any rule applies.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Readable member by member through ranged reads (the preflight inspects these without a download).
SEEKABLE_ARCHIVE_SUFFIXES = (".zip", ".tar")
# Compressed streams: only a full download shows their members (the trainer checks them).
STREAMED_ARCHIVE_SUFFIXES = tuple(s for s in ARCHIVE_SUFFIXES if s not in SEEKABLE_ARCHIVE_SUFFIXES)

_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeName(ValueError):
    """A name refused by `safe_relative`; the message completes "<kind> '<name>' …"."""


def safe_relative(name: str, *, allow_dir: bool = False) -> str:
    """`name` as a clean relative '/'-path ('' for the root folder when `allow_dir`). Raises UnsafeName."""
    cleaned = name.replace("\\", "/")  # zips written on Windows use backslashes
    if "\x00" in cleaned or cleaned.startswith("/") or _DRIVE.match(cleaned):
        raise UnsafeName("has an absolute path; store relative paths only")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeName("climbs out of the target folder ('..'); refused")
    if not parts:
        if allow_dir:
            return ""
        raise UnsafeName("has an empty name")
    return "/".join(parts)


def unsafe_names(names: list[str]) -> list[str]:
    """The names of `names` (junk skipped) that `safe_relative` refuses."""
    out = []
    for name in names:
        if is_junk(name):
            continue
        try:
            safe_relative(name)
        except UnsafeName:
            out.append(name)
    return out


def is_junk(name: str) -> bool:
    """macOS archive debris: resource forks would fail the image checks for no fault of the user."""
    parts = name.replace("\\", "/").split("/")
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


def member_refusal(member: zipfile.ZipInfo | tarfile.TarInfo) -> str | None:
    """Why an archive member is refused (completing "member '<name>' …"), or None for a file or folder."""
    if isinstance(member, zipfile.ZipInfo):
        mode = member.external_attr >> 16  # Unix mode when the zip was made on Unix, else 0
        if stat.S_ISLNK(mode):
            return "is a symbolic link; links are not accepted, store the file itself"
        special = stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR)
    else:
        if member.issym() or member.islnk():
            return (f"is a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r}); "
                    "links are not accepted, store the file itself")
        special = not (member.isreg() or member.isdir())
    return "is a device, FIFO or other special file" if special else None
