"""The webhook outbox: every event waits in the object store until its receiver answers 2xx.

    <state>/webhooks/<endpoint>/<webhook-id>/event.json   URL, webhook-id, body, queued_at (written once)
    <state>/webhooks/<endpoint>/<webhook-id>/try-<nnn>    attempt n: who claimed it and until when; after a
                                                          failure, also the error and when n+1 may start

`<endpoint>` is a hash of the URL's scheme, host and port: each receiving server is a queue of its own.

- Queue: the reconciler PUTs event.json with If-None-Match, then marks the event queued in job.json; a
  crash in between queues it again under the same webhook-id, which keeps one pending entry.
- Claim: attempt n belongs to the replica whose conditional PUT created try-<n>; only it POSTs. The claim
  is a lease: if it runs out with no outcome written (the replica died mid-attempt), the next pass claims
  attempt n+1. Delivery is at-least-once; receivers deduplicate on `webhook-id`.
- Outcome: on a 2xx, event.json is deleted (the event is done), then its tries. Otherwise the claimer
  writes the error and `retry_at` into try-<n>. After the last attempt the entry is dropped (logged and
  counted). The schedule lives in the store, so it survives restarts and moves between replicas.
- Isolation: each endpoint is drained by one worker at a time, one attempt after another, stopping at
  its first failure; a slow or failing receiver holds one worker for at most one attempt's timeouts per
  pass and never delays another endpoint's events.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgspec

from service.api.metrics import Metrics
from service.reconcile.webhooks import WebhookEvent, WebhookSender
from trainer.core.storage import NotFound, PreconditionFailed, StorageError, Store

log = logging.getLogger("lathe.webhooks")

OUTBOX_PREFIX = "webhooks/"
EVENT_KEY = "event.json"
_TRY_RE = re.compile(r"^try-(\d{3})$")
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
RETRY_CAP_S = 3600.0


def retry_delay_s(attempt: int, base_s: float) -> float:
    """Wait after failed attempt n: base × 4^(n−1), at most an hour (5 s, 20 s, 80 s, 320 s, 21 min …)."""
    return min(base_s * 4 ** (attempt - 1), RETRY_CAP_S)


def lease_s(timeout_s: float) -> float:
    """How long a claim holds: one attempt's connect, write and read timeouts, plus a margin."""
    return 3 * timeout_s + 5


def endpoint_key(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    origin = f"{parts.scheme}://{(parts.hostname or '').lower()}:{port or (443 if parts.scheme == 'https' else 80)}"
    return hashlib.sha256(origin.encode("utf-8")).hexdigest()[:16]


class QueuedEvent(msgspec.Struct, kw_only=True):
    url: str
    msg_id: str
    body: str  # the JSON document, sent byte for byte on every attempt
    queued_at: float


class Try(msgspec.Struct, kw_only=True):
    owner: str
    claimed_at: float
    lease_until: float
    ended_at: float | None = None
    error: str | None = None
    retry_at: float | None = None


@dataclass
class Entry:
    endpoint: str
    msg_id: str
    queued_at: float = 0.0
    has_event: bool = False
    tries: list[int] = field(default_factory=list)
    last_etag: str = ""  # of the highest try, as listed

    def key(self, name: str) -> str:
        return f"{self.endpoint}/{self.msg_id}/{name}"


def try_name(n: int) -> str:
    return f"try-{n:03d}"


class Outbox:
    """The outbox's layout in the store: queue, list, claim, record, remove. No threads, no HTTP."""

    def __init__(self, state_root: Store) -> None:
        self.store = state_root.child(OUTBOX_PREFIX)

    def put(self, event: WebhookEvent, now: float) -> bool:
        """Queues `event`; False when an entry with its webhook-id is already pending."""
        if not _ID_RE.match(event.msg_id):
            raise ValueError(f"webhook id {event.msg_id!r}: expected 1-200 of [A-Za-z0-9._-]")
        entry = Entry(endpoint_key(event.url), event.msg_id)
        doc = QueuedEvent(url=event.url, msg_id=event.msg_id, body=event.body(now).decode("utf-8"), queued_at=now)
        try:
            self.store.put_json(entry.key(EVENT_KEY), doc, if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def scan(self) -> dict[str, list[Entry]]:
        """endpoint → its entries, oldest first (one listing of the whole outbox)."""
        entries: dict[tuple[str, str], Entry] = {}
        for info in self.store.list(""):
            parts = info.key.split("/")
            if len(parts) != 3:
                continue
            endpoint, msg_id, name = parts
            entry = entries.setdefault((endpoint, msg_id), Entry(endpoint, msg_id))
            if name == EVENT_KEY:
                entry.has_event, entry.queued_at = True, info.last_modified
            elif m := _TRY_RE.match(name):
                n = int(m.group(1))
                if not entry.tries or n > max(entry.tries):
                    entry.last_etag = info.etag
                entry.tries.append(n)
        out: dict[str, list[Entry]] = {}
        for entry in sorted(entries.values(), key=lambda e: (e.queued_at, e.msg_id)):
            entry.tries.sort()
            out.setdefault(entry.endpoint, []).append(entry)
        return out

    def event(self, entry: Entry) -> QueuedEvent:
        return self.store.get_json(entry.key(EVENT_KEY), QueuedEvent)

    def read_try(self, entry: Entry, n: int) -> Try:
        return self.store.get_json(entry.key(try_name(n)), Try)

    def claim(self, entry: Entry, n: int, owner: str, now: float, lease: float) -> Try | None:
        """Attempt n for `owner`, or None when another replica claimed it first."""
        claim = Try(owner=owner, claimed_at=now, lease_until=now + lease)
        try:
            self.store.put_json(entry.key(try_name(n)), claim, if_none_match=True)
        except PreconditionFailed:
            return None
        return claim

    def record(self, entry: Entry, n: int, outcome: Try) -> None:
        self.store.put_json(entry.key(try_name(n)), outcome)

    def remove(self, entry: Entry, tries: list[int]) -> None:
        """event.json first: once it is gone the entry counts as done, whatever tries remain."""
        for key in [entry.key(EVENT_KEY)] + [entry.key(try_name(n)) for n in tries]:
            try:
                self.store.delete(key)
            except NotFound:
                pass


class WebhookDispatcher:
    """Queues webhook events in the outbox and delivers them from a pool of worker threads."""

    def __init__(self, outbox: Outbox, sender: WebhookSender, *, max_attempts: int = 6, retry_base_s: float = 5.0,
                 poll_s: float = 2.0, workers: int = 16, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.outbox, self.sender, self.metrics, self.clock = outbox, sender, metrics, clock
        self.max_attempts, self.retry_base_s, self.poll_s, self.workers = max_attempts, retry_base_s, poll_s, workers
        self.lease_s = lease_s(sender.timeout_s)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._todo: queue.Queue[tuple[str, list[Entry]] | None] = queue.Queue()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._client: httpx.Client | None = None
        # try key → (ETag, content): a try changes once at most (its outcome), so a pass over entries
        # waiting to retry costs one listing, not one GET per entry.
        self._tries: dict[str, tuple[str, Try]] = {}

    # -- queueing (the reconciler) --------------------------------------------------------------
    def enqueue(self, event: WebhookEvent) -> None:
        """Durable once this returns; raises StorageError when the store refuses the write."""
        self.outbox.put(event, self.clock())
        self._wake.set()

    # -- threads --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._threads = [threading.Thread(target=self._loop, name="lathe-webhooks", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"lathe-webhooks-{i}", daemon=True)
                          for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Attempts in flight finish or are abandoned; their claims run out and are retried."""
        if not self._threads:
            return
        self._stop.set()
        self._wake.set()
        for _ in range(self.workers):
            self._todo.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if not any(t.is_alive() for t in self._threads) and self._client is not None:
            self._client.close()
            self._client = None
        self._threads = []

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = self.sender.client(self.workers)
            return self._client

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 — the loop must survive a bad pass (store outage, bug)
                log.exception("webhook outbox pass failed; retrying")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def tick(self) -> None:
        """Hands each endpoint with pending entries to a worker, unless one is already on it."""
        for endpoint, entries in self._scan().items():
            with self._lock:
                if endpoint in self._busy:
                    continue
                self._busy.add(endpoint)
            self._todo.put((endpoint, entries))

    def run_pass(self) -> None:
        """One pass in the calling thread, endpoint after endpoint (tests and tools)."""
        for entries in self._scan().values():
            self.drain(entries)

    def _scan(self) -> dict[str, list[Entry]]:
        found = self.outbox.scan()
        listed = {e.key(try_name(e.tries[-1])) for entries in found.values() for e in entries if e.tries}
        with self._lock:
            self._tries = {k: v for k, v in self._tries.items() if k in listed}
        return found

    def _last_try(self, entry: Entry) -> Try:
        """The entry's highest try (raises NotFound when it is gone)."""
        key = entry.key(try_name(entry.tries[-1]))
        cached = self._tries.get(key)
        if cached is not None and cached[0] == entry.last_etag:
            return cached[1]
        # Read after the listing: the content is at least as new as the ETag it is cached under.
        last = self.outbox.read_try(entry, entry.tries[-1])
        with self._lock:
            self._tries[key] = (entry.last_etag, last)
        return last

    def _work(self) -> None:
        while (item := self._todo.get()) is not None:
            endpoint, entries = item
            try:
                self.drain(entries)
            except Exception:  # noqa: BLE001 — one endpoint's trouble must not stop the worker
                log.exception("webhook endpoint %s: pass failed; retrying", endpoint)
            finally:
                with self._lock:
                    self._busy.discard(endpoint)

    # -- delivery -------------------------------------------------------------------------------
    def drain(self, entries: list[Entry]) -> None:
        """One endpoint's due entries in order, stopping at the first failed attempt."""
        for entry in entries:
            if self._stop.is_set() or not self._step(entry):
                return

    def _step(self, entry: Entry) -> bool:
        """Advances one entry; False when an attempt to its endpoint failed just now."""
        if not entry.has_event:
            self.outbox.remove(entry, entry.tries)  # done earlier; removing its tries was cut short
            return True
        now = self.clock()
        n = entry.tries[-1] if entry.tries else 0
        if n:
            try:
                last = self._last_try(entry)
            except NotFound:
                return True  # delivered by another replica meanwhile
            if last.ended_at is None and now < last.lease_until:
                return True  # an attempt is in flight (here or on another replica)
            if n >= self.max_attempts:
                self._drop(entry, last.error or "the last attempt's lease ran out")
                return True
            if last.retry_at is not None and now < last.retry_at:
                return True
        claim = self.outbox.claim(entry, n + 1, self.owner, now, self.lease_s)
        if claim is None:
            return True  # another replica took this attempt
        tries = [*entry.tries, n + 1]
        try:
            event = self.outbox.event(entry)
        except NotFound:  # delivered by another replica between our listing and our claim
            self.outbox.remove(entry, tries)
            return True
        return self._attempt(entry, event, n + 1, claim, tries)

    def _attempt(self, entry: Entry, event: QueuedEvent, n: int, claim: Try, tries: list[int]) -> bool:
        refusal = self.sender.refusal(event.url)
        if refusal is not None:
            self._drop(entry, f"not sent to {event.url}: {refusal}", tries)
            return True
        error = self.sender.post(self._http(), event.url, event.msg_id, event.body.encode("utf-8"))
        if error is None:
            self.outbox.remove(entry, tries)
            self._count("delivered")
            log.info("webhook %s delivered (attempt %d)", event.msg_id, n)
            return True
        self._count("failed")
        log.warning("webhook %s attempt %d/%d to %s: %s", event.msg_id, n, self.max_attempts, event.url, error)
        if n >= self.max_attempts:
            self._drop(entry, f"{n} attempts failed, the last with {error}", tries)
            return False
        ended = self.clock()
        retry_at = ended + retry_delay_s(n, self.retry_base_s)
        try:
            self.outbox.record(entry, n, Try(owner=claim.owner, claimed_at=claim.claimed_at,
                                             lease_until=claim.lease_until, ended_at=ended, error=error,
                                             retry_at=retry_at))
        except StorageError as exc:  # the lease runs out instead, and the next pass retries
            log.warning("webhook %s attempt %d: outcome not recorded: %s", event.msg_id, n, exc)
        return False

    def _drop(self, entry: Entry, reason: str, tries: list[int] | None = None) -> None:
        self.outbox.remove(entry, entry.tries if tries is None else tries)
        self._count("dropped")
        log.warning("webhook %s dropped: %s", entry.msg_id, reason)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhooks.labels(outcome).inc()
