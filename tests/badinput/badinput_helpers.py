"""Builders and checks shared by the bad-input corpus (a module of its own, not conftest: test modules
import it by name, which `from conftest import` cannot do once pytest collects several folders).

Everything here is plain: byte builders for broken images and hostile archives, a small valid spec,
and the checks every case makes on an API answer (status, problem+json, no traceback, the field or
file named) and on the object store (nothing stored changed)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Iterable
from typing import Any

from tests.common_helpers import image_bytes, job_spec, png_header  # noqa: F401 (png_header: re-exported)

TOKEN = "tok-badinput-7Qx2mV9pL4"  # the one tenant's bearer token
TENANT = "acme"

# What must never reach a client: Python tracebacks and internals.
LEAK_MARKERS = ("Traceback (most recent call last)", 'File "/', "site-packages", "<_io.", " object at 0x")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------------------ images


def image(w: int = 64, h: int = 64, fmt: str = "PNG") -> bytes:
    return image_bytes(w, h, fmt=fmt)


# ---------------------------------------------------------------------------------------- archives


def zip_bytes(members: Iterable[tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]],
              compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for member in members:
            name, data = member if isinstance(member, tuple) else (member, b"")
            zf.writestr(name, data)
    return buf.getvalue()


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK: how Info-ZIP stores a symbolic link
    return info, target.encode()


def zip_patched(*, name: bytes | None = None, utf8_flag: bool = False, version_needed: int | None = None) -> bytes:
    """A one-member zip whose headers are edited afterwards: the member's name bytes (same length as
    "1_cat/ab.png"), the UTF-8 flag, the "version needed to extract". Shapes the fuzzer found."""
    data = bytearray(zip_bytes([("1_cat/ab.png", image())]))
    central = data.rfind(b"PK\x01\x02")
    if name is not None:
        assert len(name) == len("1_cat/ab.png")
        data[30:30 + len(name)] = name
        data[central + 46:central + 46 + len(name)] = name
    if utf8_flag:
        for offset in (6, central + 8):
            struct.pack_into("<H", data, offset, struct.unpack_from("<H", data, offset)[0] | 0x800)
    if version_needed is not None:
        struct.pack_into("<H", data, central + 6, version_needed)
        struct.pack_into("<H", data, 4, version_needed)
    return bytes(data)


def zip_empty_name() -> bytes:
    """A one-member zip whose member name is empty (zipfile cannot write one: the name is cut out)."""
    data = bytearray(zip_bytes([("x", image())]))
    central = data.rfind(b"PK\x01\x02")
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<H", data, central + 28, 0)
    del data[central + 46]
    struct.pack_into("<I", data, end - 1 + 12, struct.unpack_from("<I", data, end - 1 + 12)[0] - 1)  # cd size
    struct.pack_into("<H", data, 26, 0)
    del data[30]
    struct.pack_into("<I", data, end - 2 + 16, central - 1)  # cd offset
    return bytes(data)


def zip_member_before_start() -> bytes:
    """A zip whose end record puts the central directory 1000 bytes later than it is: zipfile finds the
    directory anyway, and shifts every member's offset 1000 bytes before the start of the file."""
    data = bytearray(zip_bytes(good_members()))
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 16, struct.unpack_from("<I", data, end + 16)[0] + 1000)
    return bytes(data)


def tar_bytes(members: Iterable[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for member in members:
            if isinstance(member, tuple):
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(member)
    return buf.getvalue()


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def good_members() -> list[tuple[str, bytes]]:
    return [("1_cat/a.png", image()), ("1_cat/a.txt", b"a cat")]


# ------------------------------------------------------------------------------------------- specs


def spec(bucket: str, **changes: Any) -> dict[str, Any]:
    """A small valid spec on the good dataset; dotted keys override, None removes (`{"model.uri": None}`)."""
    return job_spec(bucket, "datasets/good", **changes)


# ------------------------------------------------------------------------------------------ checks


def check_problem(resp: Any, status: int, names: Iterable[str] = ()) -> dict[str, Any]:
    """The answer is an RFC 9457 problem with `status`, leaks nothing, and its text names each of `names`."""
    assert resp.status_code == status, (resp.status_code, resp.text[:2000])
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    check_no_leak(resp.text)
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"], body
    text = json.dumps(body)
    for name in names:
        assert name in text, (name, body)
    return body


def check_no_leak(text: str) -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, (marker, text[:2000])


def problem_paths(body: dict[str, Any]) -> set[str]:
    return {p["path"] for p in body.get("problems") or []}


def snapshot(s3: Any, bucket: str, prefix: str = "") -> dict[str, str]:
    """key → ETag of every object under `prefix`."""
    out: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["ETag"]
    return out


def assert_kept(before: dict[str, str], after: dict[str, str]) -> None:
    """Every object of `before` is still there, unchanged."""
    lost = sorted(k for k in before if k not in after)
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not lost and not changed, {"lost": lost, "changed": changed}


def five_xx(app: Any) -> list[tuple[str, str, float]]:
    """(route, status, count) of every 5xx answer the app's metrics counted."""
    out = []
    for metric in app.state.services.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["status"].startswith("5") and sample.value:
                out.append((sample.labels["route"], sample.labels["status"], sample.value))
    return out

