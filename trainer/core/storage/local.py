"""A folder on a local (or mounted) file system as a Store: the same keys and listing order as S3."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.core.storage.base import ObjectInfo, Store, verify_local_size
from trainer.core.storage.errors import NotFound, PreconditionFailed, StorageError

# Temporary files of atomic local writes carry this marker and are never listed.
_TMP_MARKER = ".lathe-tmp-"


class LocalStore(Store):
    """A folder on a local (or mounted) file system. Writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(root)
        self.root_uri = self.root

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key.lstrip("/")))
        if path != self.root and not path.startswith(self.root + os.sep):
            raise ValueError(f"key {key!r} escapes the store root {self.root}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        # No content hash for free on a file system: mtime and size stand in for S3's ETag.
        return ObjectInfo(key, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}", st.st_mtime)

    def get_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            with open(self._path(key), "rb") as f:
                return f.read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        with self._errors("read", key):
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(length)

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str | None = None, if_none_match: bool = False
    ) -> None:
        path = self._path(key)
        with self._errors("write", key):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = self._write_temp(path, data)
            try:
                if if_none_match:
                    self._publish_if_absent(tmp, path, key)
                else:
                    os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _write_temp(self, path: str, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + _TMP_MARKER)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _publish_if_absent(self, tmp: str, path: str, key: str) -> None:
        # link() fails if the name exists and makes the complete content visible at once.
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            raise PreconditionFailed(f"{path} already exists (conditional write lost)", path) from None
        except OSError:
            pass  # file systems without hard links: fall back to O_EXCL (single winner still holds)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise PreconditionFailed(f"{path} already exists (conditional write lost)", path) from None
        with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
            shutil.copyfileobj(src, out)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._errors("stat", key):
            st = os.stat(path)
        if not os.path.isfile(path):
            raise NotFound(f"{path} is not a file", path)
        return self._info(key, st)

    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None,
        first_page: int | None = None,
    ) -> Iterator[ObjectInfo]:
        """Files under `prefix` in S3's key order (`first_page` shapes S3 requests; nothing here)."""
        if limit is not None and limit <= 0:
            return
        count = 0
        # Walk only the folder the prefix names; a partial last component filters its entries.
        base, _, _ = prefix.rpartition("/")
        for key, st in self._walk(base, prefix, start_after or ""):
            yield self._info(key, st)
            count += 1
            if limit is not None and count >= limit:
                return

    def _walk(self, folder_key: str, prefix: str, start_after: str) -> Iterator[tuple[str, os.stat_result]]:
        """Depth-first in S3's order: a folder `a` sorts as `a/`, so `a-b` comes before `a/x`."""
        folder = self._path(folder_key) if folder_key else self.root
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise StorageError(f"cannot list {folder}: {e}", folder) from e
        named = []
        for entry in entries:
            if _TMP_MARKER in entry.name:
                continue
            key = f"{folder_key}/{entry.name}" if folder_key else entry.name
            is_dir = entry.is_dir(follow_symlinks=True)
            named.append((key + "/" if is_dir else key, key, is_dir, entry))
        named.sort(key=lambda item: item[0])
        for sort_key, key, is_dir, entry in named:
            if is_dir:
                # Skip folders that cannot hold a key under the prefix or after start_after.
                if not (sort_key.startswith(prefix) or prefix.startswith(sort_key)):
                    continue
                if sort_key < start_after and not start_after.startswith(sort_key):
                    continue
                yield from self._walk(key, prefix, start_after)
            elif key.startswith(prefix) and key > start_after:
                try:
                    st = entry.stat(follow_symlinks=True)
                except FileNotFoundError:  # deleted since the folder was read: as S3, not listed
                    continue
                yield key, st

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors("delete", key):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            self._prune_empty_dirs(os.path.dirname(path))

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def _prune_empty_dirs(self, folder: str) -> None:
        # S3 has no folders: keep the local view the same by removing those a delete emptied.
        while folder != self.root and folder.startswith(self.root + os.sep):
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = os.path.dirname(folder)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> ObjectInfo:
        path = self._path(key)
        with self._errors("upload", key):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + _TMP_MARKER)
            os.close(fd)
            try:
                shutil.copyfile(local_path, tmp)
                verify_local_size(tmp, os.path.getsize(local_path), path)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return self.head(key)

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> ObjectInfo:
        info = self.head(key)
        dest = os.fspath(local_path)
        with self._errors("download", key):
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            tmp = dest + _TMP_MARKER + f"{os.getpid()}-{threading.get_ident()}"
            try:
                shutil.copyfile(self._path(key), tmp)
                verify_local_size(tmp, info.size, self.uri(key))
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return info

    def presign_get(self, key: str, expires_s: int = 3600) -> str:
        return Path(self._path(key)).as_uri()

    def presign_put(self, key: str, expires_s: int = 3600, content_type: str | None = None) -> str:
        return Path(self._path(key)).as_uri()

    class _errors:
        """Map OSError to our exceptions, naming the path."""

        def __init__(self, op: str, key: str) -> None:
            self.op, self.key = op, key

        def __enter__(self) -> None:
            return None

        def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
            if exc is None or isinstance(exc, StorageError) or not isinstance(exc, OSError):
                return False
            where = exc.filename or self.key
            if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
                raise NotFound(f"{self.op} {where}: no such file", str(where)) from exc
            raise StorageError(f"{self.op} {where}: {exc.strerror or exc}", str(where)) from exc
