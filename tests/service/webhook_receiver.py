"""A webhook receiver on 127.0.0.1 for the outbox tests (a module of its own, not conftest, so that
tests/faults can import it too)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    arrived: float  # time.monotonic()
    headers: dict[str, str]
    body: bytes
    status: int | None = None  # what it was answered (None while held or when the caller hung up)


class Receiver:
    """Answers the n-th POST with `statuses[n]` (the last one repeats), each after `delay_s`; while
    `hold()` is in force, requests wait for `release()` first. Keeps every call."""

    def __init__(self, statuses: tuple[int, ...] = (204,), delay_s: float = 0.0) -> None:
        self.statuses, self.delay_s = list(statuses), delay_s
        self.calls: list[Call] = []
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                call = Call(time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver._lock:
                    receiver.calls.append(call)
                    status = receiver.statuses[min(len(receiver.calls), len(receiver.statuses)) - 1]
                receiver._gate.wait(60)
                time.sleep(receiver.delay_s)
                try:
                    self.send_response(status)
                    self.end_headers()
                except OSError:
                    return  # the sender hung up (timeout, or its process was killed)
                call.status = status

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a sender that hung up mid-request is part of the tests

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def ids(self, status: int | None = None) -> list[str]:
        with self._lock:
            return [c.headers["webhook-id"] for c in self.calls if status is None or c.status == status]

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
