"""The transfer manager behind `S3Store`'s whole-object transfers: s3transfer's, on the CRT or classic.

With `awscrt` installed (the trainer image has it), downloads go through s3transfer's CRT transfer
manager: AWS's C S3 client drives every connection on its own event-loop threads, so a dataset of
thousands of small objects costs Python one serialised request each instead of a botocore call each
(several times the CPU, all of it under one interpreter lock). It is built here for our client's
endpoint, region and credential chain, which boto3's own CRT switch ignores (it targets AWS's
endpoint). Without `awscrt`, or without credentials to hand it, the classic manager runs the same
transfers through our boto3 client. Both write each object to a temporary file renamed into place,
and both retry inside the library (the CRT its own standard policy, the classic one botocore's).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any
from urllib.parse import quote, urlsplit

from trainer.core.settings import trainer_settings

MiB = 1024 * 1024
# Files above this go up/down in parts (parallel ranged requests).
MULTIPART_THRESHOLD = 8 * MiB
MULTIPART_CHUNK = 8 * MiB

_crt_lock = threading.Lock()
_crt_parts: dict[tuple[Any, ...], tuple[Any, Any] | None] = {}


def transfer_config(workers: int | None = None) -> Any:
    """boto3's TransferConfig for our transfers: `workers` objects (or parts) in flight at once."""
    from boto3.s3.transfer import TransferConfig

    workers = max(1, workers or trainer_settings().transfer_workers)
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=workers, use_threads=True,
        # boto3's own CRT switch builds for AWS's endpoint, not ours: `transfer_manager` builds the
        # CRT manager itself where it can.
        preferred_transfer_client="classic",
    )


def transfer_manager(client: Any, endpoint_url: str | None, workers: int | None = None) -> Any:
    """An s3transfer transfer manager (a context manager) for `client`'s bucket operations."""
    crt = _crt_client_and_serializer(client, endpoint_url)
    if crt is not None:
        from s3transfer.crt import CRTTransferManager

        return CRTTransferManager(*crt, config=transfer_config(workers))
    from boto3.s3.transfer import create_transfer_manager

    return create_transfer_manager(client, transfer_config(workers))


def listed_subscribers(manager: Any, info: Any) -> list[Any]:
    """The s3transfer subscribers a download of listed object `info` needs. The classic manager gets
    the size and ETag from the listing: without both it sends a HEAD before each GET (twice the
    requests, most of the CPU per small object); with the ETag, the parts of a large object are
    fetched `If-Match` it, so a change fails them. The CRT's needs none: it reads the first part and
    matches the rest to its ETag itself (and each subscriber costs it signature checks per callback)."""
    from s3transfer.manager import TransferManager

    return [_as_listed_class()(info)] if isinstance(manager, TransferManager) else []


@functools.cache
def _as_listed_class() -> type:
    from s3transfer.subscribers import BaseSubscriber

    class AsListed(BaseSubscriber):
        def __init__(self, info: Any) -> None:
            self.info = info

        def on_queued(self, future: Any, **kwargs: Any) -> None:
            future.meta.provide_transfer_size(self.info.size)
            if self.info.etag:
                future.meta.provide_object_etag(f'"{self.info.etag}"')

    return AsListed


def _crt_client_and_serializer(client: Any, endpoint_url: str | None) -> tuple[Any, Any] | None:
    """The CRT S3 client and request serializer for this client's endpoint and region (kept for the
    process: each client owns event-loop threads), or None without awscrt or credentials."""
    region = client.meta.region_name
    key = (endpoint_url, region, os.environ.get("AWS_CA_BUNDLE"), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_PROFILE"))
    with _crt_lock:
        if key not in _crt_parts:
            _crt_parts[key] = _new_crt_parts(endpoint_url, region)
        return _crt_parts[key]


def _new_crt_parts(endpoint_url: str | None, region: str) -> tuple[Any, Any] | None:
    try:
        from s3transfer.crt import (
            BotocoreCRTCredentialsWrapper, BotocoreCRTRequestSerializer, create_s3_crt_client,
        )
    except ImportError:  # awscrt is not installed
        return None
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    credentials = session.get_credentials()
    if credentials is None:  # the classic path raises botocore's clear NoCredentialsError
        return None
    crt_client = create_s3_crt_client(
        region,
        crt_credentials_provider=BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider(),
        use_ssl=urlsplit(endpoint_url).scheme != "http" if endpoint_url else True,
        verify=os.environ.get("AWS_CA_BUNDLE") or None,
    )
    serializer = _templated_gets(BotocoreCRTRequestSerializer)(session, {
        "region_name": region, "endpoint_url": endpoint_url,
        "config": Config(s3={"addressing_style": "path"} if endpoint_url else {}),
    })
    return crt_client, serializer


def _templated_gets(serializer_class: type) -> type:
    """s3transfer's botocore serializer, building a plain GET from a per-bucket template after the first.

    botocore's request pipeline (endpoint rules, event hooks, a parse of a stand-in response) costs
    about a millisecond of CPU per object, more than the CRT spends fetching a small one. Plain GETs of
    one bucket differ only in the key, so botocore builds the first and the rest reuse its path prefix
    and headers (less the per-call SDK ids) with the key quoted as botocore quotes it.
    """
    from awscrt.http import HttpHeaders, HttpRequest

    per_call = {"amz-sdk-invocation-id", "amz-sdk-request"}

    class TemplatedGets(serializer_class):  # type: ignore[misc, valid-type]
        def serialize_http_request(self, transfer_type: str, future: Any) -> Any:
            args = future.meta.call_args
            if transfer_type != "get_object" or args.extra_args:
                return super().serialize_http_request(transfer_type, future)
            templates = self.__dict__.setdefault("_templates", {})
            template = templates.get(args.bucket)
            if template is None:
                request = super().serialize_http_request(transfer_type, future)
                path, _, query = request.path.partition("?")
                quoted = quote_key(args.key)
                if path.endswith(quoted):
                    headers = [(k, v) for k, v in request.headers if k.lower() not in per_call]
                    templates[args.bucket] = (path[: len(path) - len(quoted)], f"?{query}" if query else "", headers)
                return request
            prefix, query, headers = template
            return HttpRequest("GET", prefix + quote_key(args.key) + query, HttpHeaders(headers))

    return TemplatedGets


def quote_key(key: str) -> str:
    """An object key in a request path, percent-encoded as botocore encodes it."""
    return quote(key, safe="/~")
