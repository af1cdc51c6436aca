"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1, a proxy that can cut it off, and
tiny random pipelines built once per session.

Environment defaults are set at import, before any test module imports torch or boto3:
one OpenMP thread (torch is 20-50x slower with two on a shared 2-core machine), no hub access,
LyCORIS without Triton kernels, and fake AWS credentials with no profile files or instance
metadata, so no test can reach a real AWS account.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.common_helpers import delete_bucket, free_port, s3_client

for _name, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "LYCORIS_KERNEL_BACKEND": "torch",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_name, None)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before serving {url}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server subprocess; AWS_ENDPOINT_URL points at it for the session.

    A separate process (not moto's in-process server) so that server and client threads do not
    share one GIL, and subprocesses under test reach the same server.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    try:
        _wait_http(endpoint, proc)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket on the session's server; its objects are removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=name)
    yield name
    delete_bucket(client, name)


class CuttableProxy:
    """A TCP proxy in front of the S3 server whose `outage()` makes the server unreachable.

    During an outage the listening port is closed (new connections are refused) and every open
    connection is reset, which is what clients see when the server process is stopped; then it
    listens again on the same port.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.connections = 0  # accepted so far, for tests that want to see traffic

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def outage(self, seconds: float) -> None:
        """Unreachable for `seconds` (blocks), then reachable again."""
        self.stop()
        time.sleep(seconds)
        self.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # an outage began meanwhile
                    client.close()
                    server.close()
                    return
                self._conns.update((client, server))
                self.connections += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):  # shutdown wakes the pump blocked on the other direction
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


@pytest.fixture
def s3_proxy(s3_server: str) -> Iterator[CuttableProxy]:
    """A proxy to the session's S3 server with `.endpoint` and `.outage(seconds)`."""
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = CuttableProxy((host, int(port)))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def _fresh_trainer_settings() -> Iterator[None]:
    """The trainer reads its LATHE_* settings once per process; each test reads them from its own
    environment (a test's monkeypatch.setenv must not reach the next test through the cache)."""
    from trainer.core.settings import trainer_settings

    trainer_settings.cache_clear()
    yield
    trainer_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """`tiny_pipeline(arch, single_file=False, seed=0)`: what `build_tiny_pipeline` returns (the diffusers
    folder, or the single-file checkpoint inside it), built once per session for each set of arguments
    (a build imports the diffusion stack). Suites share the folder: files written beside it need names
    of their own."""
    built: dict[tuple[str, bool, int], str] = {}

    def get(arch: str, *, single_file: bool = False, seed: int = 0) -> str:
        key = (arch, single_file, seed)
        if key not in built:
            from trainer.models.tiny import build_tiny_pipeline

            folder = tmp_path_factory.mktemp(f"tiny-{arch}") / arch
            built[key] = build_tiny_pipeline(arch, str(folder), single_file=single_file, seed=seed)
        return built[key]

    return get
