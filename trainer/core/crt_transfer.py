"""Bulk downloads through the AWS Common Runtime's S3 client (PyPI `awscrt`, AWS's own C runtime).

For a dataset of thousands of ~100 KB objects the client's CPU per object decides the rate on a small
node. The CRT signs each request (SigV4, in C), moves it over its own connection pool and writes the
body to its file on its own event-loop threads; Python only issues the request. Against `s5cmd cp`
see bench/pull.py and docs/benchmarks.md.

What stays ours, as with the other engines in `trainer.core.storage`:
- the listing, vetted by the caller before anything is requested;
- the local names: each object goes to the path the caller chose (a key never picks where it lands);
- the credentials: boto3's chain, asked afresh through a delegate whenever the CRT signs, so
  refreshed (IRSA, SSO, instance-role) credentials are picked up;
- the endpoint and addressing: learnt from one URL botocore presigns (`storage.url_layout`);
- the checks: every size is compared with the listing. Whatever the CRT leaves failed, missing or
  short is handed back and fetched again through boto3 with our bounded backoff, so a 404 or 403
  ends in the usual NotFound / AccessDenied.

Creating a file is the costliest step per object in the kernel (ext4 inode allocation), and the CRT
would create each one inside `make_request`, on the one Python thread that issues requests. A few
threads create the files first (os.open releases the GIL), so the CRT only reopens empty files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from trainer.core.host import cyclic_gc_paused, usable_cores

log = logging.getLogger(__name__)

# Threads creating the local files ahead of the requests; more only contend on the folder's lock.
_CREATORS = 2
# Files created ahead of their request at most (bounds the pipeline, not the transfers).
_AHEAD = 256
_PART_SIZE = 8 * 1024 * 1024  # ranged parts of large objects, as the boto3 path's multipart chunk
# The CRT buffers parts in memory before writing them, reserving a whole part per request in flight;
# its default cap scales with its throughput target (2 GiB and up). 1 GiB (128 parts) pulled small files
# as fast as the default; 256 MiB (32 parts) throttled them to 0.87x (docs/benchmarks.md).
_MEMORY_LIMIT = 1024 * 1024 * 1024


def crt_available() -> bool:
    try:
        import awscrt.s3  # noqa: F401
    except ImportError:
        return False
    return True


_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def _client(session: Any, scheme: str, region: str, workers: int | None) -> Any:
    """One CRT S3 client per (boto3 session, scheme, region, connection cap), kept for the process."""
    key = (session, scheme, region, workers, os.environ.get("AWS_CA_BUNDLE"), _MEMORY_LIMIT)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _new_client(session, scheme, region, workers)
        return client


def _new_client(session: Any, scheme: str, region: str, workers: int | None) -> Any:
    from awscrt.auth import AwsCredentials, AwsCredentialsProvider
    from awscrt.io import ClientBootstrap, ClientTlsContext, DefaultHostResolver, EventLoopGroup, TlsContextOptions
    from awscrt.s3 import S3Client, S3RequestTlsMode, S3RetryConfig, create_default_s3_signing_config

    signing = None
    if session is not None and session.get_credentials() is not None:
        def current_credentials() -> AwsCredentials:
            frozen = session.get_credentials().get_frozen_credentials()
            return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token or None)

        signing = create_default_s3_signing_config(
            region=region, credential_provider=AwsCredentialsProvider.new_delegate(current_credentials))
    tls_options = None
    if scheme == "https" and os.environ.get("AWS_CA_BUNDLE"):
        context = TlsContextOptions()
        context.override_default_trust_store_from_path(None, os.environ["AWS_CA_BUNDLE"])
        tls_options = ClientTlsContext(context).new_connection_options()
    loops = EventLoopGroup(_event_loop_threads())
    return S3Client(
        bootstrap=ClientBootstrap(loops, DefaultHostResolver(loops)),
        region=region,
        tls_mode=S3RequestTlsMode.ENABLED if scheme == "https" else S3RequestTlsMode.DISABLED,
        tls_connection_options=tls_options,
        signing_config=signing,
        part_size=_PART_SIZE,
        memory_limit=_MEMORY_LIMIT,
        max_active_connections_override=workers,
        retry_config=S3RetryConfig(max_retries=10),
        connect_timeout_ms=5000,
    )


def _event_loop_threads() -> int:
    """One CRT event-loop thread per core this process may run on (its CPU set), at most 8. The CRT's
    own default is one per processor of the node, whatever the pod's CPU limit: 96 threads on a 96-core
    GPU node. Each thread drives many connections; two saturate this 2-core host's server."""
    return max(1, min(usable_cores(), 8))


def _create_empty(path: str) -> None:
    """An empty file at `path` (its folder made if needed); a link there is replaced, never followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags, 0o644))
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.close(os.open(path, flags, 0o644))
    except OSError:  # ELOOP: a symlink stands there
        os.unlink(path)
        os.close(os.open(path, flags, 0o644))


class CrtDownloader:
    """GETs (object → local path) pairs through one CRT S3 client of `store`'s session and endpoint."""

    def __init__(self, store: Any, layout: tuple[str, str, str]) -> None:
        self.store = store
        self.scheme, self.netloc, self.base_path = layout

    def download(
        self, items: Iterable[tuple[Any, str | os.PathLike[str]]], workers: int | None,
    ) -> tuple[list[tuple[Any, str | os.PathLike[str]]], list[tuple[Any, str | os.PathLike[str]]]]:
        """Returns (every item, the items still failed, missing or short).

        `items` may be a lazy, vetting listing: requests go out as it yields. If it raises, every
        request is cancelled and waited for before the error propagates (the caller discards the tree).
        Transfers still running after `storage._transfer_timeout` are cancelled and handed back.
        """
        from awscrt.http import HttpHeaders, HttpRequest
        from awscrt.s3 import S3RequestType

        from trainer.core.storage import _is_missing_or_short, _quote_key, _transfer_timeout

        client = _client(self.store.session, self.scheme, self.store.client.meta.region_name, workers)
        listed: list[tuple[Any, str | os.PathLike[str]]] = []
        requests: list[tuple[int, Any]] = []
        failed: list[int] = []  # items whose request could not start

        def issue(index: int) -> None:
            info, dest = listed[index]
            request = HttpRequest(
                "GET", self.base_path + _quote_key(self.store._key(info.key)), HttpHeaders([("host", self.netloc)]))
            try:
                requests.append((index, client.make_request(
                    type=S3RequestType.GET_OBJECT, request=request, recv_filepath=os.fspath(dest))))
            except Exception as exc:  # noqa: BLE001 - e.g. the file cannot be opened: boto3 retries it
                log.debug("crt: request for %s not started: %s", info.key, exc)
                failed.append(index)

        creators = concurrent.futures.ThreadPoolExecutor(_CREATORS, thread_name_prefix="lathe-crt-create")
        pending: collections.deque[tuple[int, concurrent.futures.Future[None]]] = collections.deque()
        # No cyclic collection while transfers run. The CRT's event-loop threads take the GIL for every
        # request's completion callback; the listing's parsing triggers a collection every few hundred
        # keys, and one holds the GIL while it walks the heap, stalling every connection meanwhile.
        # Pausing it took a 2,000-image pull from 0.87x to 0.98x of `s5cmd cp` (docs/benchmarks.md).
        with cyclic_gc_paused():
            try:
                for info, dest in items:
                    listed.append((info, dest))
                    pending.append((len(listed) - 1, creators.submit(_create_empty, os.path.abspath(dest))))
                    # Issue in listing order as the files exist; wait only when too far ahead.
                    while pending and (pending[0][1].done() or len(pending) > _AHEAD):
                        self._issue_created(pending.popleft(), issue, failed)
                while pending:
                    self._issue_created(pending.popleft(), issue, failed)
                timeout_s = _transfer_timeout(len(listed))
                _, late = concurrent.futures.wait([r.finished_future for _, r in requests], timeout=timeout_s)
                if late:
                    log.warning("crt: %d of %d transfers did not finish in %.0f s; cancelling them",
                                len(late), len(requests), timeout_s)
            finally:
                creators.shutdown(wait=True, cancel_futures=True)
                self._cancel_unfinished([r for _, r in requests])
        errors = {index: r.finished_future.exception() for index, r in requests if r.finished_future.exception()}
        if errors or failed:
            log.warning("crt: %d of %d transfers failed (first: %s)", len(errors) + len(failed), len(listed),
                        next(iter(errors.values()), "not started"))
        # A failed GET of an empty object leaves a file of the right size: the explicit failures count too.
        retry = set(failed) | set(errors)
        return listed, [pair for index, pair in enumerate(listed) if index in retry or _is_missing_or_short(*pair)]

    @staticmethod
    def _issue_created(entry: tuple[int, concurrent.futures.Future[None]], issue: Any, failed: list[int]) -> None:
        index, created = entry
        if created.exception() is None:
            issue(index)
        else:
            failed.append(index)

    @staticmethod
    def _cancel_unfinished(requests: list[Any]) -> None:
        unfinished = [r for r in requests if not r.finished_future.done()]
        for request in unfinished:
            request.cancel()
        concurrent.futures.wait([r.finished_future for r in unfinished], timeout=30)
