"""An S3 bucket prefix as a Store, through one boto3 client (and the CRT's S3 client for bulk downloads).

S3 goes through boto3's standard credential chain and honours `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` (MinIO, R2, Ceph, moto…). Retries are botocore's alone, set once in the client's
Config (standard mode, `MAX_ATTEMPTS`); an operation that still fails raises a StorageError naming
the URI, and the job retries the phase as a whole (`trainer.core.jobdir.with_retries`).

Whole-object transfers go in parallel parts for large objects, each written to a temporary file
renamed into place: uploads through s3transfer's TransferManager, downloads through `transfers` (the
AWS CRT's S3 client where awscrt is installed, else that same TransferManager).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from trainer.core.settings import trainer_settings
from trainer.core.storage.base import (
    DownloadItem, ObjectInfo, Store, check_listed_size, join_key,
)
from trainer.core.storage.errors import AccessDenied, NotFound, PreconditionFailed, StorageError
from trainer.core.storage.transfers import Fetch, ObjectFailed, fetch_all, transfer_config

T = TypeVar("T")

# botocore's attempts per request (standard mode: capped exponential backoff, about 45 s in all on
# average): enough to ride out a server restart; longer outages are the job-level retry's.
MAX_ATTEMPTS = 10

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}

_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint boto3 would use: explicit, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL."""
    if endpoint_url:
        return endpoint_url
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None, *, max_attempts: int = MAX_ATTEMPTS) -> Any:
    """A shared, thread-safe boto3 S3 client for this endpoint and credential environment."""
    endpoint = resolve_endpoint(endpoint_url)
    env_key = tuple(os.environ.get(name) for name in (
        "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"))
    cache_key = (endpoint, env_key, max_attempts)
    with _client_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = _clients[cache_key] = _new_client(endpoint, max_attempts)
        return client


def _new_client(endpoint: str | None, max_attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        # The client is shared: the transfer threads and, in the service, every request thread at once
        # (a full pool drops connections and the next request pays a new TCP handshake).
        max_pool_connections=max(64, 2 * trainer_settings().transfer_workers),
        connect_timeout=5,
        read_timeout=60,
        tcp_keepalive=True,
        # Custom endpoints (MinIO, moto, Ceph) rarely have wildcard DNS for bucket hosts.
        s3={"addressing_style": "path"} if endpoint else {},
        # Without it botocore presigns with legacy SigV2 in us-east-1 (AWS refuses SigV2 on buckets
        # made since 2020); SigV4 URLs carry X-Amz-Expires, capped by S3 at 7 days.
        signature_version="s3v4",
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=session.region_name or "us-east-1", config=config)


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def map_error(op: str, uri: str, bucket: str, exc: BaseException) -> StorageError:
    """The StorageError for what boto3 raised while doing `op` on `uri`."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (S3UploadFailedError, S3TransferFailedError)) and exc.__cause__ is not None:
        return map_error(op, uri, bucket, exc.__cause__)  # boto3 wraps the real error
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        if code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
            return NotFound(f"{op} {uri}: no such object", uri)
        if code in _PRECONDITION_CODES or status == 412:
            return PreconditionFailed(f"{op} {uri}: object already exists (conditional write lost)", uri)
        if code == "NoSuchBucket":
            return StorageError(f"{op} {uri}: bucket {bucket!r} does not exist", uri)
        if code in _DENIED_CODES:
            return AccessDenied(f"{op} {uri}: access denied ({code}); check the credentials "
                                "(AWS_ACCESS_KEY_ID / profile) and the bucket policy", uri)
        return StorageError(f"{op} {uri}: {code or status} {exc}", uri)
    if isinstance(exc, NoCredentialsError):
        return AccessDenied(f"{op} {uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            "or AWS_PROFILE", uri)
    # Connection trouble that outlasted the client's own retries (botocore's or the CRT's).
    return StorageError(f"{op} {uri}: {type(exc).__name__}: {exc} (gave up after retrying)", uri)


class S3Store(Store):
    page_size = 1000  # keys per LIST request (S3's maximum); tests lower it to exercise paging

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self.endpoint_url = resolve_endpoint(endpoint_url)
        self.client = client if client is not None else s3_client(self.endpoint_url, max_attempts=max_attempts)
        self.root_uri = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return self.prefix + key.lstrip("/")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, join_key(self.prefix, prefix), endpoint_url=self.endpoint_url, client=self.client)

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run one boto3 operation (botocore retried it already), its failure as a StorageError."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - mapped to our errors right here
            raise map_error(op, self.uri(key), self.bucket, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        return self._call("get", key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""

        def read() -> bytes:
            from botocore.exceptions import ClientError

            try:
                resp = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}")
            except ClientError as e:
                if _error_code(e)[0] == "InvalidRange":  # start past the end: like reading at EOF
                    return b""
                raise
            return resp["Body"].read()

        return self._call("get range of", key, read)

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str | None = None, if_none_match: bool = False
    ) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if content_type:
            args["ContentType"] = content_type
        if if_none_match:
            args["IfNoneMatch"] = "*"
        self._call("put", key, lambda: self.client.put_object(**args))

    def head(self, key: str) -> ObjectInfo:
        resp = self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return ObjectInfo(key, int(resp["ContentLength"]), resp.get("ETag", "").strip('"'),
                          resp["LastModified"].timestamp())

    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None,
        first_page: int | None = None,
    ) -> Iterator[ObjectInfo]:
        """Objects under `prefix` in key order. `first_page` keys are asked for in the first request
        only: a short first page reaches the caller (and its first transfers) a round trip sooner."""
        remaining = limit
        token: str | None = None
        cut = len(self.prefix)
        page_size = first_page or self.page_size
        while remaining is None or remaining > 0:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
            args["MaxKeys"] = page_size if remaining is None else min(page_size, remaining)
            page_size = self.page_size
            if token:
                args["ContinuationToken"] = token
            elif start_after:
                args["StartAfter"] = self._key(start_after)
            page = self._call("list", prefix, lambda args=args: self.client.list_objects_v2(**args))
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][cut:], int(obj["Size"]), obj.get("ETag", "").strip('"'),
                                 obj["LastModified"].timestamp())
                if remaining is not None:
                    remaining -= 1
                    if remaining <= 0:
                        return
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        batch: list[str] = []
        for info in self.list(prefix):
            batch.append(info.key)
            if len(batch) == 1000:  # DeleteObjects' maximum
                deleted += self._delete_batch(prefix, batch)
                batch = []
        if batch:
            deleted += self._delete_batch(prefix, batch)
        return deleted

    def _delete_batch(self, prefix: str, keys: list[str]) -> int:
        objects = [{"Key": self._key(k)} for k in keys]
        resp = self._call("delete", prefix, lambda: self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}))
        if resp.get("Errors"):
            first = resp["Errors"][0]
            raise StorageError(
                f"delete under {self.uri(prefix)}: {len(resp['Errors'])} objects failed, first "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}", self.uri(prefix))
        return len(keys)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        size = os.path.getsize(local_path)
        self._call("upload", key, lambda: self.client.upload_file(
            os.fspath(local_path), self.bucket, self._key(key), Config=transfer_config(8)))
        info = self.head(key)
        if info.size != size:
            raise StorageError(f"upload of {local_path} to {self.uri(key)} is incomplete: {info.size} bytes "
                               f"stored, {size} sent", self.uri(key))
        return info

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        info = self.head(key)
        self.download_many([(info, local_path)], workers=8)
        return info

    def download_many(self, items: Iterable[DownloadItem], *, workers: int | None = None) -> int:
        """`Store.download_many` through `transfers.fetch_all` (the CRT where installed)."""
        folders: set[str] = set()

        def fetches() -> Iterator[Fetch]:
            for info, dest in items:
                path = os.path.abspath(dest)
                folder = os.path.dirname(path)
                if folder not in folders:
                    os.makedirs(folder, exist_ok=True)
                    folders.add(folder)
                yield info, self._key(info.key), path

        total = 0
        # Closed on the way out, so a size check that fails here stops what is still in flight at once.
        fetched = contextlib.closing(fetch_all(self.client, self.endpoint_url, self.bucket, fetches(), workers))
        try:
            with fetched as done:
                for info, path in done:
                    check_listed_size(self.uri(info.key), info.size, os.path.getsize(path))
                    total += info.size
        except ObjectFailed as failed:
            raise map_error("download", self.uri(failed.info.key), self.bucket, failed.__cause__) from failed.__cause__
        return total

    def presign_get(self, key: str, expires_s: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s)

    def presign_put(self, key: str, expires_s: int = 3600, content_type: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if content_type:
            params["ContentType"] = content_type
        return self.client.generate_presigned_url("put_object", Params=params, ExpiresIn=expires_s)
