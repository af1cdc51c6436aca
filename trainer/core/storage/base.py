"""The interface every store implements, and the behaviour they share."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from trainer.core.settings import trainer_settings
from trainer.core.storage.errors import NotFound, StorageError

# Parallel transfers for many small objects (datasets).

# A pair of a bulk download: the listed object and the local path it goes to.
DownloadItem = tuple["ObjectInfo", "str | os.PathLike[str]"]


class ObjectInfo(msgspec.Struct, frozen=True):
    key: str  # relative to the store's root
    size: int
    etag: str
    last_modified: float  # seconds since the epoch


def join_key(prefix: str, key: str) -> str:
    """`prefix` and `key` joined with exactly one '/' (an empty prefix leaves the key alone)."""
    if not prefix:
        return key.lstrip("/")
    return prefix.rstrip("/") + "/" + key.lstrip("/") if key else prefix.rstrip("/") + "/"


class Store(abc.ABC):
    """Keys are relative to `root_uri`, '/'-separated, without a leading '/'."""

    root_uri: str

    @abc.abstractmethod
    def uri(self, key: str) -> str: ...

    @abc.abstractmethod
    def child(self, prefix: str) -> Store: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def put_bytes(
        self, key: str, data: bytes, *, content_type: str | None = None, if_none_match: bool = False
    ) -> None: ...

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None,
        first_page: int | None = None,
    ) -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    @abc.abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo: ...

    @abc.abstractmethod
    def presign_get(self, key: str, expires_s: int = 3600) -> str: ...

    @abc.abstractmethod
    def presign_put(self, key: str, expires_s: int = 3600, content_type: str | None = None) -> str: ...

    # Shared behaviour ------------------------------------------------------------------------

    def get_json(self, key: str, type: Any = None) -> Any:
        """Decode a JSON object (msgspec; into `type` when given). Decoding errors propagate."""
        data = self.get_bytes(key)
        return msgspec.json.decode(data, type=type) if type is not None else msgspec.json.decode(data)

    def put_json(self, key: str, obj: Any, *, if_none_match: bool = False) -> None:
        self.put_bytes(
            key, msgspec.json.encode(obj), content_type="application/json", if_none_match=if_none_match
        )

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    def download_many(self, items: Iterable[DownloadItem], *, workers: int | None = None) -> int:
        """Download (listed object, local path) pairs in parallel; every size is checked against the
        listing. Returns the bytes downloaded.

        `items` may be a lazy listing that vets as it goes: each object is queued as soon as it is
        yielded, and if the listing raises (or a download fails) the queued transfers are cancelled,
        the running ones waited for, and the error raised. The caller discards the partial tree.
        """
        total = 0
        with ThreadPoolExecutor(max(1, workers or trainer_settings().transfer_workers), thread_name_prefix="lathe-dl") as pool:
            futures = []
            try:
                for info, dest in items:
                    futures.append(pool.submit(self._download_listed, info, dest))
                    total += info.size
                for future in futures:
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return total

    def _download_listed(self, info: ObjectInfo, local_path: str | os.PathLike[str]) -> None:
        got = self.download_file(info.key, local_path)
        check_listed_size(self.uri(info.key), info.size, got.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


def check_listed_size(uri: str, listed: int, fetched: int) -> None:
    """A download whose size differs from the listing's: the object changed meanwhile."""
    if fetched != listed:
        raise StorageError(
            f"{uri} changed during the download (size {listed} listed, {fetched} fetched); retry the job", uri)


def verify_local_size(path: str | os.PathLike[str], expected: int, uri: str) -> None:
    size = os.path.getsize(path)
    if size != expected:
        raise StorageError(
            f"download of {uri} is incomplete: {size} bytes on disk, {expected} expected", uri
        )
