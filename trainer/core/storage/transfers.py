"""How `S3Store` fetches many listed objects at once: on the AWS CRT's S3 client, or s3transfer's threads.

With `awscrt` installed (the trainer image has it), downloads go to the CRT's S3 client as built by
s3transfer (`create_s3_crt_client`, credentials from botocore's chain): C event-loop threads drive every
connection, sign every request and split large objects into ranged parts (each fetched `If-Match` the
first part's ETag), and retry on their own. Python only hands over one request per object and renames
the finished file into place. That keeps a dataset of thousands of small files near `s5cmd cp`'s speed;
s3transfer's own CRT manager costs about as much Python per object again (futures, subscribers,
callbacks under the interpreter lock), and boto3's CRT switch targets AWS's endpoint, not ours.

Without `awscrt` (the service image), or without credentials to hand it, s3transfer's classic
TransferManager runs the same downloads through our boto3 client and botocore's retries.

Both write each object to a temporary file renamed into place, and both, when one object fails, stop
queueing, cancel or finish what is in flight, leave no temporary file, and raise `ObjectFailed`.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from trainer.core.settings import trainer_settings
from trainer.core.storage.base import ObjectInfo

MiB = 1024 * 1024
# Files above this go up/down in parts (parallel ranged requests).
MULTIPART_THRESHOLD = 8 * MiB
MULTIPART_CHUNK = 8 * MiB
# Requests handed to the CRT ahead of the oldest unfinished one: enough to keep its connections busy.
CRT_WINDOW = 256

# (listed object, key in the bucket, local path)
Fetch = tuple[ObjectInfo, str, str]

_crt_lock = threading.Lock()
_crt_parts: dict[tuple[Any, ...], tuple[Any, Any] | None] = {}
_temp_names = itertools.count()


class ObjectFailed(Exception):
    """The download of `info` failed; the library's error is the __cause__."""

    def __init__(self, info: ObjectInfo) -> None:
        super().__init__(info.key)
        self.info = info


def transfer_config(workers: int | None = None) -> Any:
    """boto3's TransferConfig for our transfers: `workers` objects (or parts) in flight at once."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=max(1, workers or trainer_settings().transfer_workers), use_threads=True,
        # boto3's own CRT switch builds for AWS's endpoint, not ours (see the module's docstring).
        preferred_transfer_client="classic",
    )


def fetch_all(client: Any, endpoint_url: str | None, bucket: str, fetches: Iterable[Fetch],
              workers: int | None = None) -> Iterator[tuple[ObjectInfo, str]]:
    """Download every (info, key, path) of `fetches`, queued as they come; yields each (info, path)
    once the file is in place, raises ObjectFailed for the first that fails."""
    crt = _crt_client_and_requests(client, endpoint_url)
    if crt is not None:
        return _crt_fetch(*crt, bucket, fetches)
    return _classic_fetch(client, bucket, fetches, workers)


# -- the CRT ------------------------------------------------------------------------------------
def _crt_fetch(crt_client: Any, requests: Any, bucket: str, fetches: Iterable[Fetch]) -> Iterator[tuple[ObjectInfo, str]]:
    from awscrt.s3 import S3RequestType

    pending: collections.deque[tuple[ObjectInfo, str, str, Any]] = collections.deque()
    try:
        for info, key, path in fetches:
            temp = f"{path}.lathe-{os.getpid()}-{next(_temp_names)}.part"
            try:
                request = crt_client.make_request(type=S3RequestType.GET_OBJECT, request=requests.get(bucket, key),
                                                  recv_filepath=temp)
            except Exception as exc:  # noqa: BLE001 - refused before it started (e.g. the client is shutting down)
                raise ObjectFailed(info) from exc
            pending.append((info, path, temp, request))
            while len(pending) >= CRT_WINDOW:
                yield _crt_finish(requests, *pending.popleft())
        while pending:
            yield _crt_finish(requests, *pending.popleft())
    finally:  # a failure, here or in the caller: stop what is still in flight
        for *_, request in pending:
            request.cancel()
        for _, _, temp, request in pending:
            request.finished_future.exception()
            _remove(temp)


def _crt_finish(requests: Any, info: ObjectInfo, path: str, temp: str, request: Any) -> tuple[ObjectInfo, str]:
    # The rename is ours, after the request's future: the CRT may resolve it before its own
    # on-done callback has run, so a rename there could race whoever reads the file next.
    error = request.finished_future.exception()
    if error is not None:
        _remove(temp)
        raise ObjectFailed(info) from requests.translate(error)
    os.replace(temp, path)  # replaces a link at `path` rather than writing through it
    return info, path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _crt_client_and_requests(client: Any, endpoint_url: str | None) -> tuple[Any, Any] | None:
    """The CRT S3 client and the GET builder for this client's endpoint and region (kept for the
    process: each CRT client owns event-loop threads), or None without awscrt or credentials."""
    region = client.meta.region_name
    # The pid: a forked child has none of its parent's event-loop threads, so it needs its own client.
    key = (os.getpid(), endpoint_url, region, os.environ.get("AWS_CA_BUNDLE"), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_PROFILE"))
    with _crt_lock:
        if key not in _crt_parts:
            _crt_parts[key] = _new_crt_parts(endpoint_url, region)
        return _crt_parts[key]


def _new_crt_parts(endpoint_url: str | None, region: str) -> tuple[Any, Any] | None:
    try:
        from s3transfer.crt import BotocoreCRTCredentialsWrapper, create_s3_crt_client
    except ImportError:  # awscrt is not installed
        return None
    import botocore.session

    session = botocore.session.get_session()
    credentials = session.get_credentials()
    if credentials is None:  # the classic path raises botocore's clear NoCredentialsError
        return None
    use_ssl = urlsplit(endpoint_url).scheme != "http" if endpoint_url else True
    crt_client = create_s3_crt_client(
        region,
        crt_credentials_provider=BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider(),
        use_ssl=use_ssl,
        # The CA bundle botocore would use; read only where there is TLS to verify.
        verify=(os.environ.get("AWS_CA_BUNDLE") or None) if use_ssl else None,
    )
    return crt_client, GetRequests(session, endpoint_url, region)


class GetRequests:
    """Unsigned GET requests for the CRT (it signs them), as botocore would build them.

    botocore's request pipeline (endpoint rules, event hooks, a parse of a stand-in response) costs
    about a millisecond of CPU per object, more than the CRT spends fetching a small one. Plain GETs of
    one bucket differ only in the key, so s3transfer's botocore serializer builds the first and the
    rest reuse its path prefix and headers (less the per-call SDK ids), the key quoted as botocore
    quotes it. The same serializer turns the CRT's errors into botocore's.
    """

    _PER_CALL = {"amz-sdk-invocation-id", "amz-sdk-request"}

    def __init__(self, session: Any, endpoint_url: str | None, region: str) -> None:
        from botocore.config import Config
        from s3transfer.crt import BotocoreCRTRequestSerializer

        self.serializer = BotocoreCRTRequestSerializer(session, {
            "region_name": region, "endpoint_url": endpoint_url,
            "config": Config(s3={"addressing_style": "path"} if endpoint_url else {}),
        })
        self._templates: dict[str, tuple[str, str, list[tuple[str, str]]]] = {}

    def botocore_get(self, bucket: str, key: str) -> Any:
        """The request as botocore builds it."""
        from s3transfer.crt import CRTTransferFuture, CRTTransferMeta
        from s3transfer.utils import CallArgs

        call = CallArgs(bucket=bucket, key=key, fileobj=None, extra_args={}, subscribers=[])
        return self.serializer.serialize_http_request("get_object", CRTTransferFuture(meta=CRTTransferMeta(0, call)))

    def get(self, bucket: str, key: str) -> Any:
        from awscrt.http import HttpHeaders, HttpRequest

        template = self._templates.get(bucket)
        if template is None:
            request = self.botocore_get(bucket, key)
            path, _, query = request.path.partition("?")
            quoted = quote_key(key)
            if path.endswith(quoted):
                headers = [(k, v) for k, v in request.headers if k.lower() not in self._PER_CALL]
                self._templates[bucket] = (path[: len(path) - len(quoted)], f"?{query}" if query else "", headers)
            return request
        prefix, query, headers = template
        return HttpRequest("GET", prefix + quote_key(key) + query, HttpHeaders(headers))

    def translate(self, error: BaseException) -> BaseException:
        """botocore's ClientError for an S3 error response; other errors (connection) as they are."""
        try:
            return self.serializer.translate_crt_exception(error) or error
        except Exception:  # noqa: BLE001 - an error we cannot translate is reported as it came
            return error


def quote_key(key: str) -> str:
    """An object key in a request path, percent-encoded as botocore encodes it."""
    return quote(key, safe="/~")


# -- s3transfer's threads -----------------------------------------------------------------------
def _classic_fetch(client: Any, bucket: str, fetches: Iterable[Fetch],
                   workers: int | None) -> Iterator[tuple[ObjectInfo, str]]:
    from boto3.s3.transfer import create_transfer_manager

    queued = []
    # Leaving the block with an exception (the listing refused, a transfer failed) cancels what is
    # queued and waits for what runs; s3transfer leaves no temporary file behind.
    with create_transfer_manager(client, transfer_config(workers)) as manager:
        for info, key, path in fetches:
            queued.append((info, path, manager.download(bucket, key, path, subscribers=[_as_listed_class()(info)])))
        for info, _, future in queued:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the caller maps it
                raise ObjectFailed(info) from exc
    for info, path, _ in queued:
        yield info, path


@functools.cache
def _as_listed_class() -> type:
    """An s3transfer subscriber giving a download the size and ETag from the listing. Without both,
    s3transfer sends a HEAD before each GET (twice the requests, most of the CPU per small object);
    with the ETag, the parts of a large object are fetched `If-Match` it, so a change fails them."""
    from s3transfer.subscribers import BaseSubscriber

    class AsListed(BaseSubscriber):
        def __init__(self, info: ObjectInfo) -> None:
            self.info = info

        def on_queued(self, future: Any, **kwargs: Any) -> None:
            future.meta.provide_transfer_size(self.info.size)
            if self.info.etag:
                future.meta.provide_object_etag(f'"{self.info.etag}"')

    return AsListed
