"""What the benchmarks share: a local S3 server (moto's, in its own process, on 127.0.0.1) with the
environment that points boto3 and child processes at it, a free port, waiting for a server to answer,
and percentiles."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

# Dummy credentials for the local server: boto3 needs some, the server accepts any.
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(*, export: bool = True) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A moto server on a free loopback port: yields (endpoint, process). With `export`, this process's
    environment points at it (AWS_ENDPOINT_URL + dummy credentials), so children inherit it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(endpoint + "/moto-api/", proc, "moto server")
        if export:
            os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
            os.environ.pop("AWS_PROFILE", None)
        yield endpoint, proc
    finally:
        stop_process(proc)


def wait_for(url: str, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 60) -> None:
    """Return once `url` answers (an HTTP error is an answer: the server is up); SystemExit if `proc`
    exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (an anonymous request may well be refused)
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what} did not start on {url}") from None
            time.sleep(0.1)


def stop_process(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def seed_tiny_job_inputs(s3, bucket: str) -> None:
    """Create `bucket` with what the API benches submit against: a placeholder model
    (`models/tiny/`) and 8 captioned 512² images (`datasets/tiny/5_cat/`)."""
    s3.create_bucket(Bucket=bucket)
    for i in range(8):
        s3.put_object(Bucket=bucket, Key=f"datasets/tiny/5_cat/{i}.png", Body=solid_png(512, 512))
        s3.put_object(Bucket=bucket, Key=f"datasets/tiny/5_cat/{i}.txt", Body=b"a cat")
    s3.put_object(Bucket=bucket, Key="models/tiny/model_index.json", Body=b"{}")


def solid_png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0–1) of `values`, nearest rank from below; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
