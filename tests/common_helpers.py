"""Helpers several test folders share: job specs and their overrides, image bytes, polling, free
ports, S3 clients, seeded buckets and their teardown, one-tenant tokens files, and the app clients.
A uniquely named module, imported as `tests.common_helpers` (never through `conftest`)."""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def apply_changes(doc: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`doc` with dotted keys overridden (`{"training.max_train_steps": 5}`); a None value removes the key."""
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


def job_spec(bucket: str, data_prefix: str = "datasets/tiny", model_prefix: str = "models/tiny",
             **changes: Any) -> dict[str, Any]:
    """A small valid spec training `s3://<bucket>/<model_prefix>` on `s3://<bucket>/<data_prefix>` for 3
    steps on the CPU; dotted keys override, None removes (`{"training.max_train_steps": 5, "model.uri": None}`)."""
    doc: dict[str, Any] = {
        "version": 1,
        "model": {"uri": f"s3://{bucket}/{model_prefix}"},
        "dataset": {"uri": f"s3://{bucket}/{data_prefix}", "resolution": 64, "caption_extension": ".txt"},
        "training": {"max_train_steps": 3},
        "resources": {"gpus": 0},
    }
    return apply_changes(doc, changes)


def image_bytes(w: int = 64, h: int = 64, color: tuple[int, int, int] = (200, 80, 40), fmt: str = "PNG") -> bytes:
    """A one-colour RGB image encoded as `fmt` (any format PIL writes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, fmt)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h with almost no pixel data (a decompression bomb's header):
    decoding it fails, so a check that passes or refuses it can only have read the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "",
             proc: subprocess.Popen | None = None) -> Any:
    """The first truthy value of `predicate()`, polled every `interval_s`; AssertionError after `timeout_s`,
    or as soon as `proc` (a process the value depends on) has exited."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        if proc is not None and proc.poll() is not None:
            output = "".join(o if isinstance(o, str) else o.decode(errors="replace") for o in proc.communicate() if o)
            raise AssertionError(f"process exited early with {proc.returncode} while waiting for "
                                 f"{what or predicate}:\n{output[-4000:]}")
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}; last value {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of the local test server (fake credentials: no real account is reachable)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def delete_bucket(s3: Any, name: str) -> None:
    """Empty the bucket (every page of the listing), then delete it."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=name)


def seeded_bucket(s3: Any, prefix: str, dataset_dirs: Iterable[str], image: bytes) -> str:
    """A new bucket `<prefix>-<random>` with a model placeholder (models/tiny/model_index.json) and, in
    each of `dataset_dirs` (keys under the bucket), two copies of `image` captioned "a cat"."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="models/tiny/model_index.json", Body=b"{}")
    for folder in dataset_dirs:
        for i in range(2):
            s3.put_object(Bucket=name, Key=f"{folder}/{i}.png", Body=image)
            s3.put_object(Bucket=name, Key=f"{folder}/{i}.txt", Body=b"a cat")
    return name


def write_one_tenant_tokens(path: Path, tenant: str, token_sha256: str, bucket: str, output_prefix: str,
                            max_concurrent_jobs: int, max_gpus_per_job: int) -> Path:
    """A tokens file at `path` with one tenant that may read the bucket's models/ and datasets/ and
    write under `output_prefix` (a key prefix in the bucket)."""
    path.write_text(json.dumps({"tenants": [{
        "name": tenant, "token_sha256": [token_sha256],
        "model_prefixes": [f"s3://{bucket}/models/"], "dataset_prefixes": [f"s3://{bucket}/datasets/"],
        "output_prefixes": [f"s3://{bucket}/{output_prefix}"],
        "limits": {"max_concurrent_jobs": max_concurrent_jobs, "max_gpus_per_job": max_gpus_per_job,
                   "max_runtime_s": 3600},
    }]}))
    return path


def app_clients(settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """For a fixture to `yield from`: a factory of the real app (built from `settings(**overrides)`)
    behind litestar's TestClient; every client is closed and its launcher's trainers killed at the end."""
    from litestar.testing import TestClient

    from service.api.app import create_app

    opened: list[Any] = []

    def make(**overrides: Any) -> Any:
        client = TestClient(create_app(settings(**overrides), events_poll_s=0.1), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in reversed(opened):
        launcher = client.app.state.services.extra.get("launcher")
        client.__exit__(None, None, None)
        if launcher is not None and hasattr(launcher, "shutdown"):
            launcher.shutdown(kill=True, timeout_s=5)
