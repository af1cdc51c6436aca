"""Job inputs on local disk: the base model through a node-local cache, the dataset into a folder.

Torch-free (PIL is imported lazily, only to read image headers).

- `fetch_model(uri, cache_dir)`: an s3:// prefix (diffusers folder) or single file (.safetensors/.ckpt)
  lands in `cache_dir/models/<content key>/`, the key hashing every object's name, size and ETag, so a
  changed model is a different entry and the same model under two URIs is one. A file lock makes two
  jobs on one node download once; a `.complete` marker written last makes an interrupted download
  invisible. Local paths come back as they are.
- `fetch_dataset(uri, dest_dir)`: an s3:// prefix, or a .zip/.tar(.gz) archive on S3 or local disk,
  becomes a local folder. Archive members that would land outside the folder (`../`, absolute paths,
  links, devices) and archives that expand past the size limit are refused before anything lands
  there; images over the pixel limit are refused from their header alone (PIL decodes only on
  `load()`). Bad content raises `JobFailure(dataset_invalid | model_invalid)` naming the file or member;
  transport trouble raises `StorageError` (retryable).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import msgspec

from trainer.core.archives import ARCHIVE_SUFFIXES, UnsafeName, is_junk, member_refusal, safe_relative
from trainer.core.failures import JobFailure, Reason
from trainer.core.images import IMAGE_EXTENSIONS, ImageTooLarge, UnreadableImage, header_size, is_image
from trainer.core.jobdir import sha256_file, with_retries
from trainer.core.settings import trainer_settings
from trainer.core.storage import AccessDenied, NotFound, ObjectInfo, S3Store, StorageError, parse_uri

log = logging.getLogger(__name__)

T = TypeVar("T")


MODEL_WEIGHT_EXTENSIONS = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
COMPLETE_SUFFIX = ".complete"
_COPY_CHUNK = 1024 * 1024


# ------------------------------------------------------------------------------------ the model


class ModelFetch(msgspec.Struct, frozen=True):
    """Where the model is on disk and what it cost to get it there (for logs and metadata)."""

    path: str
    content_key: str  # sha256 over (name, size, ETag) of every object; "" for local paths
    downloaded: bool  # False on a cache hit or a local path
    bytes: int
    seconds: float


def fetch_model(uri: str, cache_dir: str) -> str:
    """Local path of the base model `uri` (s3 prefix, s3 file or local path), cached by content."""
    return ensure_model(uri, cache_dir).path


def ensure_model(uri: str, cache_dir: str) -> ModelFetch:
    """`fetch_model` with the details: cache hit or download, bytes, seconds."""
    started = time.monotonic()
    scheme, bucket, key = parse_uri(uri)
    if scheme == "file":
        _check_local_model(key, uri)
        return ModelFetch(key, "", False, 0, time.monotonic() - started)

    store = S3Store(bucket)
    objects, single_file = _list_model(store, key, uri)
    names = _model_names(objects, key, single_file, uri)
    _refuse_duplicates(names, f"model {uri}", "object", Reason.MODEL_INVALID)
    for (name, info) in zip(names, objects):
        if info.size == 0 and name.lower().endswith(MODEL_WEIGHT_EXTENSIONS):
            raise JobFailure(
                Reason.MODEL_INVALID,
                f"model file {store.uri(info.key)} is empty (0 bytes); upload the model again",
            )
    digest = hashlib.sha256(
        "\n".join(sorted(f"{n}\t{o.size}\t{o.etag}" for n, o in zip(names, objects))).encode()
    ).hexdigest()
    total = sum(o.size for o in objects)

    models_dir = os.path.join(os.path.abspath(cache_dir), "models")
    entry = os.path.join(models_dir, digest[:40])
    marker = entry + COMPLETE_SUFFIX
    result = os.path.join(entry, names[0]) if single_file else entry

    if os.path.exists(marker):  # fast path, no lock: the marker only appears once complete
        _touch(marker)
        return ModelFetch(result, digest, False, total, time.monotonic() - started)

    from filelock import FileLock, Timeout

    os.makedirs(models_dir, exist_ok=True)
    lock = FileLock(entry + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another job on this node is downloading %s; waiting for it", uri)
        lock.acquire()
    try:
        if os.path.exists(marker):  # the other job finished it while we waited
            _touch(marker)
            return ModelFetch(result, digest, False, total, time.monotonic() - started)
        _ensure_free_space(models_dir, total, uri)
        for stale in glob.glob(glob.escape(entry) + ".partial-*"):  # from jobs killed mid-download
            shutil.rmtree(stale, ignore_errors=True)
        partial = f"{entry}.partial-{os.getpid()}"
        log.info("downloading model %s (%d files, %.1f MB)", uri, len(objects), total / 1e6)
        pairs = [(o, os.path.join(partial, n)) for n, o in zip(names, objects)]
        _retried(lambda: store.download_many(pairs), what=f"downloading model {uri}")
        shutil.rmtree(entry, ignore_errors=True)  # left by a run that died before its marker
        os.rename(partial, entry)
        _write_atomic(marker, msgspec.json.encode({"uri": uri, "files": dict(zip(names, objects))}))
    finally:
        lock.release()
    return ModelFetch(result, digest, True, total, time.monotonic() - started)


def _list_model(store: S3Store, key: str, uri: str) -> tuple[list[ObjectInfo], bool]:
    """The model's objects and whether it is a single file (else a folder)."""
    if key and not key.endswith("/") and key.lower().endswith(MODEL_WEIGHT_EXTENSIONS):
        try:
            return [store.head(key)], True
        except NotFound:
            raise JobFailure(Reason.MODEL_INVALID, f"model file {uri} does not exist") from None
    folder = key if not key or key.endswith("/") else key + "/"
    # Zero-byte keys ending in '/' are folder placeholders some tools create; not files.
    objects = [o for o in store.list(folder) if not (o.key.endswith("/") and o.size == 0)]
    if objects:
        return objects, False
    if key and not key.endswith("/"):
        try:
            return [store.head(key)], True
        except NotFound:
            pass
    raise JobFailure(
        Reason.MODEL_INVALID,
        f"no model at {uri}: no object with that key and nothing under {folder!r}; give a diffusers "
        "folder prefix or a .safetensors/.ckpt file",
    )


def _model_names(objects: list[ObjectInfo], key: str, single_file: bool, uri: str) -> list[str]:
    """Local relative names of the model's objects, refusing any that would escape the cache entry."""
    if single_file:
        name = os.path.basename(objects[0].key) or "model"
        return [_safe_relative(name, f"model {uri}", Reason.MODEL_INVALID)]
    folder = key if not key or key.endswith("/") else key + "/"
    return [
        _safe_relative(o.key[len(folder):], f"model {uri}", Reason.MODEL_INVALID) for o in objects
    ]


def _check_local_model(path: str, uri: str) -> None:
    if not os.path.exists(path):
        raise JobFailure(Reason.MODEL_INVALID, f"model path {uri} does not exist")
    files = [path] if os.path.isfile(path) else [
        os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs
    ]
    for f in files:
        if f.lower().endswith(MODEL_WEIGHT_EXTENSIONS) and os.path.getsize(f) == 0:
            raise JobFailure(Reason.MODEL_INVALID, f"model file {f} is empty (0 bytes); replace it")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise JobFailure(Reason.MODEL_INVALID, f"model file {path} is empty (0 bytes); replace it")


def _ensure_free_space(folder: str, needed: int, uri: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        # Another node may have room: retryable, not the model's fault.
        raise StorageError(
            f"model cache {folder} has {free / 1e9:.1f} GB free, {uri} needs {needed / 1e9:.1f} GB; "
            "free the cache or give it a larger volume", uri,
        )


def _touch(path: str) -> None:
    try:
        os.utime(path)  # marks recent use, for whoever prunes the cache by age
    except OSError:
        pass


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- the dataset


def fetch_dataset(
    uri: str,
    dest_dir: str,
    *,
    max_bytes: int | None = None,
    max_files: int | None = None,
    max_pixels: int | None = None,
    workers: int | None = None,
    sources: dict | None = None,
) -> str:
    """Local folder holding the dataset `uri`; local folders are checked and returned as they are.

    `dest_dir` is replaced by the download (nothing appears there until everything passed the
    checks). The limits default to LATHE_MAX_DATASET_BYTES / _FILES and LATHE_MAX_IMAGE_PIXELS
    (trainer/core/settings.py). `workers` is the number of objects in flight (`Store.download_many`). `sources`, when
    given, is filled with what the store said about the objects read (the dataset manifest's input):
    `objects` {relative path: (key, size, ETag)} for a folder, `archive` {key, size, etag, sha256}.
    An S3 download that fails on the store's side is started again from the listing until
    `with_retries` gives up (an outage); refusals (JobFailure) and missing objects are not retried.
    """
    sources = {} if sources is None else sources
    limits = _default_limits(max_bytes, max_files, max_pixels)
    scheme, bucket, key = parse_uri(uri)
    if scheme == "file":
        return _local_dataset(uri, key, dest_dir, limits, sources)
    store = S3Store(bucket)
    if key.lower().endswith(ARCHIVE_SUFFIXES):
        return _retried(lambda: _s3_archive_dataset(store, uri, key, dest_dir, limits, sources),
                        what=f"downloading dataset archive {uri}")
    return _retried(lambda: _s3_prefix_dataset(store, uri, key, dest_dir, limits, sources, workers),
                    what=f"downloading dataset {uri}")


def _retried(fn: Callable[[], T], *, what: str) -> T:
    """`fn` again through an outage (`with_retries`), but not on refused credentials: those need a
    person, so the job fails at once, for the same reason (`storage_error`)."""
    def once() -> T:
        try:
            return fn()
        except AccessDenied as exc:
            raise JobFailure(Reason.STORAGE_ERROR, exc.message) from exc

    return with_retries(once, what=what)


def _local_dataset(uri: str, path: str, dest_dir: str, limits: _Limits, sources: dict) -> str:
    if os.path.isdir(path):
        check_images(path, limits.max_pixels, where=f"dataset {uri}")
        return path
    if not os.path.exists(path):
        raise JobFailure(Reason.DATASET_INVALID, f"dataset path {uri} does not exist")
    if not path.lower().endswith(ARCHIVE_SUFFIXES):
        raise JobFailure(
            Reason.DATASET_INVALID,
            f"dataset {uri} is a file but not an archive; give a folder or a {'/'.join(ARCHIVE_SUFFIXES)} file",
        )
    sources["archive"] = {"key": os.path.basename(path), "size": os.path.getsize(path), "etag": None,
                          "sha256": sha256_file(path)}
    with _staging(dest_dir) as staging:
        extract_archive(path, staging, limits=limits, where=f"dataset archive {uri}")
        check_images(staging, limits.max_pixels, where=f"dataset archive {uri}", member=True)
    return dest_dir


def _s3_archive_dataset(store: S3Store, uri: str, key: str, dest_dir: str, limits: _Limits, sources: dict) -> str:
    try:
        info = store.head(key)
    except NotFound:
        raise JobFailure(Reason.DATASET_INVALID, f"dataset archive {uri} does not exist") from None
    if info.size > limits.max_bytes:
        raise JobFailure(
            Reason.DATASET_INVALID,
            f"dataset archive {uri} is {info.size} bytes, over the limit of {limits.max_bytes}; "
            "split the dataset or raise LATHE_MAX_DATASET_BYTES",
        )
    with _staging(dest_dir) as staging:
        archive = f"{staging}.archive-{os.getpid()}{_archive_suffix(key)}"
        try:
            store.download_many([(info, archive)])
            sources["archive"] = {"key": key, "size": info.size, "etag": info.etag, "sha256": sha256_file(archive)}
            extract_archive(archive, staging, limits=limits, where=f"dataset archive {uri}")
        finally:
            if os.path.exists(archive):
                os.unlink(archive)
        check_images(staging, limits.max_pixels, where=f"dataset archive {uri}", member=True)
    return dest_dir


def _s3_prefix_dataset(store: S3Store, uri: str, key: str, dest_dir: str, limits: _Limits, sources: dict,
                       workers: int | None) -> str:
    folder = key if not key or key.endswith("/") else key + "/"
    objects = sources.setdefault("objects", {})
    objects.clear()  # what an earlier, failed attempt listed
    with _staging(dest_dir) as staging:
        # The listing is vetted as it is read, while the transfers run: a refusal stops both.
        def listed() -> Iterator[tuple[ObjectInfo, str]]:
            for rel, info in _vetted_listing(store, folder, uri, limits):
                objects[rel] = (info.key, info.size, info.etag)
                yield info, os.path.join(staging, rel)

        store.download_many(listed(), workers=workers)
        check_images(staging, limits.max_pixels, where=f"dataset {uri}")
    return dest_dir


class _Limits(msgspec.Struct, frozen=True):
    max_bytes: int
    max_files: int
    max_pixels: int


def _default_limits(max_bytes: int | None = None, max_files: int | None = None,
                    max_pixels: int | None = None) -> _Limits:
    """The given limits, the settings' for those not given."""
    s = trainer_settings()
    return _Limits(s.max_dataset_bytes if max_bytes is None else max_bytes,
                   s.max_dataset_files if max_files is None else max_files,
                   s.max_image_pixels if max_pixels is None else max_pixels)


# Keys in the dataset listing's first LIST request: the transfers start after ~100 keys are parsed
# instead of 1,000 (a LIST page is a 100-200 ms round trip on S3), for one request more.
_FIRST_PAGE = 100


def _vetted_listing(store: S3Store, folder: str, uri: str, limits: _Limits) -> Iterator[tuple[str, ObjectInfo]]:
    """(relative path, object) for every file under the prefix, checked as the listing arrives.

    Raises JobFailure(dataset_invalid) at the first object past a limit (so the listing, and what was
    transferred meanwhile, stay bounded by the limits), at an unsafe key, at two keys mapping to one
    local name or a name that is both a file and a folder, and at the end if there was nothing.
    """
    count = total = 0
    names: set[str] = set()
    folders: set[str] = set()
    for info in store.list(folder, first_page=_FIRST_PAGE):
        rel = info.key[len(folder):]
        if rel.endswith("/") and info.size == 0:
            continue  # folder placeholder
        if is_junk(rel):
            continue
        rel = _safe_relative(rel, f"dataset {uri}", Reason.DATASET_INVALID, kind="object")
        count += 1
        total += info.size
        if count > limits.max_files:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"dataset {uri} has more than {limits.max_files} files; split it or raise "
                "LATHE_MAX_DATASET_FILES",
            )
        if total > limits.max_bytes:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"dataset {uri} holds more than {limits.max_bytes} bytes; split it or raise "
                "LATHE_MAX_DATASET_BYTES",
            )
        _refuse_clash_with_earlier(rel, names, folders, f"dataset {uri}")
        yield rel, info
    if not count:
        raise JobFailure(Reason.DATASET_INVALID, f"dataset {uri} is empty: no objects under {folder!r}")


def _refuse_clash_with_earlier(name: str, names: set[str], folders: set[str], where: str) -> None:
    """Refuse `name` if an earlier object has the same local name, or one of the two would have to be
    both a file and a folder (S3 allows `a` beside `a/b`; a disk does not). Records `name`."""
    if name in names:
        raise JobFailure(Reason.DATASET_INVALID, f"{where}: two objects map to the local name {name!r}")
    if name in folders:
        raise JobFailure(
            Reason.DATASET_INVALID,
            f"{where}: object {name!r} is both a file and the folder of another object; rename one of them",
        )
    parts = name.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in names:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{where}: object {parent!r} is both a file and the folder of {name!r}; rename one of them",
            )
        folders.add(parent)
    names.add(name)


class _staging:
    """A sibling folder to fill; it replaces `dest_dir` only if everything inside succeeded."""

    def __init__(self, dest_dir: str) -> None:
        self.dest = os.path.abspath(dest_dir)
        self.path = f"{self.dest}.partial-{os.getpid()}"

    def __enter__(self) -> str:
        for stale in glob.glob(glob.escape(self.dest) + ".partial-*"):  # from an attempt killed mid-way
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(self.path)
        return self.path

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        shutil.rmtree(self.dest, ignore_errors=True)
        os.rename(self.path, self.dest)
        return False


# ------------------------------------------------------------------------------------- archives


def _archive_suffix(name: str) -> str:
    lower = name.lower()
    return next(s for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True) if lower.endswith(s))


def extract_archive(
    archive_path: str, dest_dir: str, *, limits: _Limits | None = None, where: str | None = None
) -> int:
    """Extract a .zip or .tar(.gz/.bz2/.xz) into `dest_dir` safely. Returns the bytes written.

    Refused with `JobFailure(dataset_invalid)` naming the member: paths escaping `dest_dir`,
    absolute paths, symlinks, hard links, devices, duplicate names, more files or bytes than the
    limits (counted on the bytes actually written, so a lying header does not help a zip bomb).
    """
    limits = limits or _default_limits()
    where = where or f"archive {archive_path}"
    budget = _Budget(limits, where)
    try:
        if zipfile.is_zipfile(archive_path):
            _extract_zip(archive_path, dest_dir, budget, where)
        elif tarfile.is_tarfile(archive_path):
            _extract_tar(archive_path, dest_dir, budget, where)
        else:
            raise JobFailure(Reason.DATASET_INVALID, f"{where} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, RuntimeError, NotImplementedError, ValueError,
            IndexError) as e:
        # RuntimeError: encrypted zip members; NotImplementedError: unsupported compression or zip version;
        # ValueError (UnicodeDecodeError): a name flagged UTF-8 that is not; IndexError: an empty member name
        # (zipfile's is_dir). All are the archive's fault: final, not retried.
        raise JobFailure(Reason.DATASET_INVALID, f"{where} is damaged or unsupported: {e}") from e
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise  # the local disk's trouble (full, I/O error), not the archive's
        # A damaged zip directory can put a member's offset before the file's start: zipfile then seeks
        # to a negative position (EINVAL): the archive's fault, not the disk's.
        raise JobFailure(Reason.DATASET_INVALID, f"{where} is damaged: a member lies outside the file ({e})") from e
    return budget.bytes


class _Budget:
    """Counts files and bytes as they land, refusing the first to cross a limit."""

    def __init__(self, limits: _Limits, where: str) -> None:
        self.limits, self.where = limits, where
        self.files = 0
        self.bytes = 0
        self.names: set[str] = set()

    def add_file(self, rel: str) -> None:
        if rel in self.names:
            raise JobFailure(
                Reason.DATASET_INVALID, f"{self.where}: member {rel!r} appears twice; rebuild the archive"
            )
        self.names.add(rel)
        self.files += 1
        if self.files > self.limits.max_files:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{self.where} has more than {self.limits.max_files} files (at member {rel!r}); split it "
                "or raise LATHE_MAX_DATASET_FILES",
            )

    def add_bytes(self, n: int, rel: str) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{self.where} expands to more than {self.limits.max_bytes} bytes (at member {rel!r}); "
                "refusing it as a possible archive bomb; split it or raise LATHE_MAX_DATASET_BYTES",
            )


def _extract_zip(path: str, dest: str, budget: _Budget, where: str) -> None:
    with zipfile.ZipFile(path) as zf:
        members = zf.infolist()
        plan = []
        declared = 0
        for info in members:
            if is_junk(info.filename):
                continue
            rel = _safe_relative(info.filename, where, Reason.DATASET_INVALID, kind="member",
                                 allow_dir=info.is_dir())
            _refuse_member(info, info.filename, where)
            declared += info.file_size
            plan.append((info, rel))
        # Declared sizes first: refuses an honest bomb before a single byte is written.
        if declared > budget.limits.max_bytes:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{where} expands to {declared} bytes, over the limit of {budget.limits.max_bytes}; "
                "refusing it as a possible archive bomb; split it or raise LATHE_MAX_DATASET_BYTES",
            )
        for info, rel in plan:
            target = _target(dest, rel)
            if info.is_dir():
                _make_member_dir(target, where, rel)
                continue
            budget.add_file(rel)
            with zf.open(info) as src:
                _copy_member(src, target, budget, rel)


def _extract_tar(path: str, dest: str, budget: _Budget, where: str) -> None:
    # Streaming mode ("r|*"): one pass, no seeking back into a compressed stream.
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            if is_junk(member.name):
                continue
            rel = _safe_relative(member.name, where, Reason.DATASET_INVALID, kind="member",
                                 allow_dir=member.isdir())
            _refuse_member(member, member.name, where)
            target = _target(dest, rel)
            if member.isdir():
                _make_member_dir(target, where, rel)
                continue
            budget.add_file(rel)
            src = tf.extractfile(member)
            assert src is not None  # regular files always have data
            _copy_member(src, target, budget, rel)


def _refuse_member(member: zipfile.ZipInfo | tarfile.TarInfo, name: str, where: str) -> None:
    refusal = member_refusal(member)
    if refusal:
        raise JobFailure(Reason.DATASET_INVALID, f"{where}: member {name!r} {refusal}")


def _copy_member(src: IO[bytes], target: str, budget: _Budget, rel: str) -> None:
    # makedirs under the guard too: member "a" then "a/b" fails on the file "a" (was an uncaught
    # FileExistsError, i.e. an `internal` failure that was retried).
    with _member_clash(budget.where, rel):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "xb") as out:
            while chunk := src.read(_COPY_CHUNK):
                budget.add_bytes(len(chunk), rel)
                out.write(chunk)


def _make_member_dir(target: str, where: str, rel: str) -> None:
    with _member_clash(where, rel):
        os.makedirs(target, exist_ok=True)


@contextlib.contextmanager
def _member_clash(where: str, rel: str) -> Iterator[None]:
    """Turns the OS errors of a file/folder name clash between members into dataset_invalid."""
    try:
        yield
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        raise JobFailure(
            Reason.DATASET_INVALID,
            f"{where}: member {rel!r} clashes with another member of the same name "
            f"(a file and a folder, or names differing only in separators): {e.strerror}",
        ) from e


def _target(dest: str, rel: str) -> str:
    target = os.path.join(dest, *rel.split("/"))
    # Belt and braces: _safe_relative refused '..' and absolute names; links are never created.
    real_dest = os.path.realpath(dest)
    if not os.path.realpath(target).startswith(real_dest + os.sep):
        raise JobFailure(Reason.DATASET_INVALID, f"member {rel!r} would land outside {dest}")
    return target


# ---------------------------------------------------------------------------------- path safety


def _safe_relative(
    name: str, where: str, reason: Reason, *, kind: str = "file", allow_dir: bool = False
) -> str:
    """`name` as a clean relative '/'-path, or JobFailure (the rule is `trainer.core.archives`)."""
    try:
        return safe_relative(name, allow_dir=allow_dir)
    except UnsafeName as e:
        raise JobFailure(reason, f"{where}: {kind} {name!r} {e}") from None


def _refuse_duplicates(
    names: list[str], where: str, kind: str, reason: Reason = Reason.DATASET_INVALID
) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise JobFailure(reason, f"{where}: two {kind}s map to the local name {name!r}")
        seen.add(name)


# ---------------------------------------------------------------------------------- image checks


def iter_images(folder: str) -> Iterator[tuple[str, str]]:
    """(relative '/'-path, absolute path) of every image file under `folder`, sorted."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        base = os.path.relpath(root, folder).replace(os.sep, "/")  # once per folder, not per file
        prefix = "" if base == "." else base + "/"
        for name in sorted(files):
            if is_image(name):
                yield prefix + name, os.path.join(root, name)


def check_images(folder: str, max_pixels: int, *, where: str, member: bool = False) -> int:
    """Refuse unreadable images and images over `max_pixels`, reading headers only. Returns the count."""
    kind = "member" if member else "image"
    count = 0
    for rel, full in iter_images(folder):
        try:
            width, height = header_size(full)
        except ImageTooLarge as e:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{where}: {kind} {rel!r} is over the limit of {max_pixels} pixels ({e}); downscale it",
            ) from e
        except UnreadableImage as e:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{where}: {kind} {rel!r} is not a readable image ({e}); "
                "fix or remove it",
            ) from e
        if width * height > max_pixels:
            raise JobFailure(
                Reason.DATASET_INVALID,
                f"{where}: {kind} {rel!r} is {width}x{height} = {width * height} pixels, over the "
                f"limit of {max_pixels}; downscale it (it was not decoded)",
            )
        count += 1
    if count == 0:
        raise JobFailure(
            Reason.DATASET_INVALID,
            f"{where} contains no images ({', '.join(IMAGE_EXTENSIONS)}); check the URI",
        )
    return count
