"""Storage URIs in their canonical form: the one place that says which object or file a URI names.

`parse_uri` is what every opener (`open_store`, the trainer's fetches, the preflight) goes through, and
`Location.is_under` is what the service's tenant check compares, so a URI is checked as exactly the
thing that will be opened; nothing downstream decodes or normalises it again.

- `s3://bucket/key`: the key is taken literally (S3 decodes nothing, and `%` is an ordinary key
  character). `%2e`, `%2f` and `%5c` (any case) are refused all the same: a proxy, gateway or client
  that decodes them would reach `.`, `/` or `\\` where the check saw none.
- `file:///path`: decoded exactly once. Separators that arrive encoded (`%2f`, `%5c`) are refused, and
  so are the decoded path's `.`/`..` segments and any `%2e`/`%2f`/`%5c` left after the decode (a second
  decode elsewhere would turn them into dots or separators).
- A plain path (no scheme): taken literally and made absolute; a relative path is relative to the
  working directory (a local CLI convenience; the service refuses relative paths).

Everywhere: no `.`/`..` segments in absolute forms, no backslashes, no NUL or control characters;
S3 keys also no empty segments (`a//b` is another key than `a/b`, while a path's `//` is just `/`).
Torch-free: the service imports it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import NamedTuple

_ENCODED_DOT_OR_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What boto3 accepts as a bucket name; anything else could change the request path.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


class Location(NamedTuple):
    """A URI in canonical form: `scheme` "s3" or "file"; `bucket` ("" for files); `key`, the S3 key as
    given or the absolute, decoded local path."""

    scheme: str
    bucket: str
    key: str

    def is_under(self, prefix: Location) -> bool:
        """Whether this lies under `prefix` as a folder: `s3://b/acme` covers `s3://b/acme/x` and
        itself, not `s3://b/acme-evil/x`. A `file://` URI and a plain path naming the same folder agree."""
        if (self.scheme, self.bucket) != (prefix.scheme, prefix.bucket):
            return False
        base, path = prefix.key.rstrip("/"), self.key.rstrip("/")
        return not base or path == base or path.startswith(base + "/")


def parse_uri(uri: str) -> Location:
    """The canonical form of an s3:// URI, a file:// URI or a local path; ValueError names what is wrong."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("storage URI is empty: give s3://bucket/prefix or a local path")
    if _CONTROL.search(uri):
        raise ValueError(f"storage URI {uri!r} holds a control character; remove it")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if len(bucket) < 3 or not _BUCKET.match(bucket):
            raise ValueError(f"storage URI {uri!r} has no valid bucket name: use s3://bucket/key")
        encoded = _ENCODED_DOT_OR_SEPARATOR.search(key)
        if encoded:
            raise ValueError(f"storage URI {uri!r} holds {encoded.group(0)!r}, a percent-encoded '.', '/' or '\\': "
                             "S3 keys are not percent-decoded, so write the key exactly as it is stored")
        _refuse_segments(uri, key, empty=True)
        return Location("s3", bucket, key)
    if uri.startswith("file://"):
        return Location("file", "", _file_path(uri))
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"unsupported storage URI scheme {scheme!r} in {uri!r}: use s3:// or a path")
    path = os.path.expanduser(uri)
    if os.path.isabs(path):
        _refuse_segments(uri, path, empty=False)
    elif "\\" in path:
        raise ValueError(f"storage URI {uri!r} holds a backslash; use '/' between folders")
    return Location("file", "", os.path.abspath(path))


def _file_path(uri: str) -> str:
    parsed = urllib.parse.urlsplit(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names a remote host; use file:///absolute/path")
    if parsed.query or parsed.fragment or uri.endswith(("?", "#")):
        raise ValueError(f"file URI {uri!r} has a query or fragment ('?', '#'); write them as %3F and %23")
    encoded = _ENCODED_SEPARATOR.search(parsed.path)
    if encoded:
        raise ValueError(f"file URI {uri!r} holds {encoded.group(0)!r}, a percent-encoded separator; "
                         "write '/' between folders")
    try:
        path = urllib.parse.unquote(parsed.path, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"file URI {uri!r} percent-encodes bytes that are not UTF-8") from None
    if _CONTROL.search(path):
        raise ValueError(f"file URI {uri!r} decodes to a control character; remove it")
    encoded = _ENCODED_DOT_OR_SEPARATOR.search(path)
    if encoded:
        raise ValueError(f"file URI {uri!r} decodes to {encoded.group(0)!r}, still a percent-encoded '.', '/' "
                         "or '\\': encode each character once")
    if not path.startswith("/"):
        raise ValueError(f"file URI {uri!r} has no absolute path; use file:///absolute/path")
    _refuse_segments(uri, path, empty=False)
    return os.path.abspath(path)


def _refuse_segments(uri: str, path: str, *, empty: bool) -> None:
    if "\\" in path:
        raise ValueError(f"storage URI {uri!r} holds a backslash; use '/' between folders")
    segments = path.split("/")
    if any(seg in (".", "..") for seg in segments):
        raise ValueError(f"storage URI {uri!r} has a '.' or '..' segment (encoded or not); name the folder "
                         "directly")
    if empty and "" in segments[:-1]:
        raise ValueError(f"storage URI {uri!r} has an empty segment ('//'); remove the extra '/'")
