"""Webhooks on job state changes, signed per the Standard Webhooks spec (standardwebhooks.com).

Headers: `webhook-id` (stable across retries of one event, so receivers deduplicate),
`webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256>` over
`<id>.<timestamp>.<body>` with the secret's bytes (`whsec_<base64>`). Delivery runs on a background
thread with exponential backoff; only 2xx counts as delivered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

log = logging.getLogger("lathe.webhooks")


class WebhookSecretError(ValueError):
    pass


def decode_secret(secret: str) -> bytes:
    body = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except ValueError:
        raise WebhookSecretError("LATHE_WEBHOOK_SECRET: expected 'whsec_' followed by base64") from None
    if len(key) < 16:
        raise WebhookSecretError("LATHE_WEBHOOK_SECRET: the key must be at least 16 bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(key: bytes, headers: dict[str, str], body: bytes, *, tolerance_s: int = 300,
           now: float | None = None) -> bool:
    """What a receiver does (used by tests and documented for users)."""
    try:
        ts = int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(key, headers.get("webhook-id", ""), ts, body).split(",", 1)[1]
    given = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


@dataclass(frozen=True)
class WebhookEvent:
    url: str
    msg_id: str
    type: str  # job.succeeded, job.failed, job.cancelled, job.phase
    data: dict[str, Any]


class WebhookSender:
    def __init__(self, *, secret: str | None, max_attempts: int = 6, timeout_s: float = 10.0,
                 allow_private: bool = False, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = decode_secret(secret) if secret else None
        self.max_attempts, self.timeout_s, self.allow_private = max_attempts, timeout_s, allow_private
        self.sleep, self.clock = sleep, clock
        self._queue: queue.Queue[WebhookEvent | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lathe-webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def send(self, event: WebhookEvent) -> None:
        self.start()
        self._queue.put(event)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
            while (event := self._queue.get()) is not None:
                try:
                    ok = self.deliver(event, client)
                except Exception:  # noqa: BLE001 — one bad event must not stop the sender
                    log.exception("webhook %s to %s crashed", event.msg_id, event.url)
                    ok = False
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1

    def deliver(self, event: WebhookEvent, client: httpx.Client) -> bool:
        problem = None if self.allow_private else destination_problem(event.url)
        if problem is not None:
            log.warning("webhook %s not sent to %s: %s", event.msg_id, event.url, problem)
            return False
        body = msgspec.json.encode({"type": event.type, "timestamp": _iso(self.clock()), "data": event.data})
        delay = 1.0
        for attempt in range(1, self.max_attempts + 1):
            ts = int(self.clock())
            headers = {"content-type": "application/json", "webhook-id": event.msg_id, "webhook-timestamp": str(ts)}
            if self.key is not None:
                headers["webhook-signature"] = sign(self.key, event.msg_id, ts, body)
            try:
                resp = client.post(event.url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    return True
                log.warning("webhook %s attempt %d: HTTP %d", event.msg_id, attempt, resp.status_code)
            except httpx.HTTPError as exc:
                log.warning("webhook %s attempt %d: %s", event.msg_id, attempt, exc)
            if attempt < self.max_attempts:
                self.sleep(delay)
                delay = min(delay * 2, 300.0)
        return False


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def destination_problem(url: str) -> str | None:
    """Why `url` may not receive webhooks (its host is missing, does not resolve, or resolves to a
    private, loopback, link-local, reserved or multicast address: the service must not be usable to
    reach the cluster's own network), or None when it may."""
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        return "the URL has no host"
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return f"host {host!r} does not resolve"
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast:
            return f"host {host!r} is a private or loopback address ({addr})"
    return None
