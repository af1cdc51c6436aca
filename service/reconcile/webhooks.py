"""Webhooks on job state changes, signed per the Standard Webhooks spec (standardwebhooks.com).

Headers: `webhook-id` (stable across retries of one event, so receivers deduplicate),
`webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256>` over
`<id>.<timestamp>.<body>` with the secret's bytes (`whsec_<base64>`). Queueing, retries and leases
live in service/state/outbox.py; this module makes one attempt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec


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

    def body(self, created_at: float) -> bytes:
        """The JSON sent, made once when the event is queued so that every attempt sends the same bytes."""
        return msgspec.json.encode({"type": self.type, "timestamp": _iso(created_at), "data": self.data})


class WebhookSender:
    """One delivery attempt: the destination check, the signature, one POST. Retries, ordering and
    leases are the outbox's (service/state/outbox.py)."""

    def __init__(self, *, secret: str | None, timeout_s: float = 10.0, allow_private: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = decode_secret(secret) if secret else None
        self.timeout_s, self.allow_private, self.clock = timeout_s, allow_private, clock

    def client(self, connections: int) -> httpx.Client:
        return httpx.Client(timeout=self.timeout_s, follow_redirects=False,
                            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    def refusal(self, url: str) -> str | None:
        """Why `url` may not be called now (checked at each attempt: a name can change what it resolves to)."""
        return None if self.allow_private else destination_problem(url)

    def post(self, client: httpx.Client, url: str, msg_id: str, body: bytes) -> str | None:
        """None when the receiver answered 2xx, else what went wrong (for the log and the outbox)."""
        ts = int(self.clock())
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts)}
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, msg_id, ts, body)
        try:
            # The status line is the answer; the body is never read, so a receiver that trickles it
            # cannot hold the attempt past its connect, write and read timeouts (the outbox's lease).
            with client.stream("POST", url, content=body, headers=headers) as resp:
                status = resp.status_code
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]
        return None if 200 <= status < 300 else f"HTTP {status}"


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
