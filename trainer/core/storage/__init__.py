"""Object-store access for the service and the trainer: S3 (boto3) or a local folder, one interface.

Torch-free on purpose: the service image imports this package and has no torch.

`open_store("s3://bucket/prefix")` or `open_store("/some/folder")` gives a `Store` whose keys are
relative to its root. Transport failures raise `StorageError` (failure reason `storage_error`,
retryable); a missing object raises `NotFound`; a lost conditional write (`If-None-Match: *`) raises
`PreconditionFailed`; refused credentials raise `AccessDenied`. All are StorageErrors carrying `.uri`.

Modules: `uris` (what a URI names), `errors`, `base` (the `Store` interface and what every store
shares), `local` (`LocalStore`), `s3` (`S3Store`: one boto3 client, botocore's retries), `transfers` (how
it fetches many listed objects at once: the AWS CRT's S3 client where awscrt is installed).
"""

from __future__ import annotations

from trainer.core.storage.base import ObjectInfo, Store, join_key, verify_local_size
from trainer.core.storage.errors import AccessDenied, NotFound, PreconditionFailed, StorageError
from trainer.core.storage.local import LocalStore
from trainer.core.storage.s3 import S3Store, resolve_endpoint, s3_client
from trainer.core.storage.uris import Location, parse_uri

__all__ = [
    "AccessDenied", "Location", "LocalStore", "NotFound", "ObjectInfo", "PreconditionFailed", "S3Store",
    "StorageError", "Store", "join_key", "open_store", "parse_uri", "resolve_endpoint", "s3_client",
    "verify_local_size",
]


def open_store(root_uri: str, *, endpoint_url: str | None = None) -> Store:
    """A Store rooted at an s3://bucket/prefix, a file:// URI or a local folder path, as `parse_uri`
    reads it (the canonical form the service's tenant check compares)."""
    scheme, bucket, key = parse_uri(root_uri)
    if scheme == "s3":
        return S3Store(bucket, key, endpoint_url=endpoint_url)
    return LocalStore(key)
