"""The job directory on object storage: where it is, its spec, status heartbeat, cancel marker, checkpoints.

`python -m trainer run <dir>/spec.json` keeps everything about the job in `<dir>/`. `JobDir` is that
folder, worked out once from the spec URI; every phase takes its keys and store from it. This module is
the trainer's only writer there besides publishing; it tolerates a flaky store during training (a missed
heartbeat is retried on the next tick) and retries hard where losing a write would lose work
(checkpoints, the final status).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from trainer.core.failures import JobFailure, Reason
from trainer.core.jobkeys import (
    CANCEL_KEY, CHECKPOINTS_PREFIX, LOG_KEY, MANIFEST_NAME, OUTPUT_PREFIX, STATUS_KEY, TENSORBOARD_PREFIX,
)
from trainer.core.spec import JobSpec, SpecError, decode_spec
from trainer.core.status import ErrorInfo, JobStatus, OutputFile, Progress
from trainer.core.storage import Location, NotFound, StorageError, Store, open_store, parse_uri

log = logging.getLogger("lathe.jobdir")


T = TypeVar("T")


@dataclass(frozen=True)
class JobDir:
    """The folder holding the spec: `location` is its canonical form, `store` is rooted there.

    Made once per attempt (`from_spec_uri`); nothing downstream parses the spec URI again.
    """

    spec_uri: str          # as given on the command line: what messages name
    spec: Location         # the spec file, canonical
    location: Location     # the job directory, canonical
    store: Store

    @classmethod
    def from_spec_uri(cls, spec_uri: str) -> JobDir:
        """ValueError (naming the URI) for a URI `parse_uri` refuses."""
        spec = parse_uri(spec_uri)
        if spec.scheme == "s3":
            parent = spec.key.rsplit("/", 1)[0] if "/" in spec.key else ""
            location = Location("s3", spec.bucket, parent)
            root = f"s3://{spec.bucket}/{parent}" if parent else f"s3://{spec.bucket}"
        else:  # symlinks resolved: the folder the spec file really lies in
            location = Location("file", "", str(Path(spec.key).resolve().parent))
            root = location.key
        return cls(spec_uri, spec, location, open_store(root))

    @property
    def uri(self) -> str:
        """The store's root URI: what metadata.json records as `job` and the default seed derives from."""
        return self.store.root_uri

    @property
    def spec_key(self) -> str:
        return self.spec.key.rsplit("/", 1)[-1]

    def output_store(self) -> Store:
        """Where outputs go unless the spec names `save.output_uri`."""
        return self.store.child(OUTPUT_PREFIX)

    def read_spec(self) -> JobSpec:
        """The job's spec; a missing or invalid one is a `spec_invalid` failure naming the URI."""
        try:
            if self.spec.scheme == "s3":
                data = with_retries(lambda: self.store.get_bytes(self.spec_key), what="reading the spec")
            else:
                data = Path(self.spec.key).read_bytes()
        except (NotFound, FileNotFoundError):
            raise JobFailure(Reason.SPEC_INVALID, f"no spec at {self.spec_uri}") from None
        try:
            return decode_spec(data, format="toml" if self.spec.key.endswith(".toml") else "auto")
        except SpecError as exc:
            raise JobFailure(Reason.SPEC_INVALID, f"{self.spec_uri}: {exc}") from None

    def resolve_input(self, uri: str) -> str:
        """A URI from the spec as the fetchers take it: relative local paths in a spec given as a local
        path are relative to the job directory (like a config file's); everything else is left alone."""
        if "://" in uri or os.path.isabs(uri) or "://" in self.spec_uri:
            return uri
        return str((Path(self.location.key) / uri).resolve())


def with_retries(fn: Callable[[], T], *, what: str, deadline_s: float = 180.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """Retry a storage operation through an outage of up to `deadline_s` (boto3 retries only briefly)."""
    start, delay = clock(), 0.5
    while True:
        try:
            return fn()
        except NotFound:
            raise
        except StorageError as exc:
            if clock() - start > deadline_s:
                raise JobFailure(Reason.STORAGE_ERROR, f"{what}: object store unreachable for {deadline_s:.0f} s: {exc}") from exc
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            sleep(delay)
            delay = min(delay * 2, 8.0)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class StatusReporter:
    """Owns `status.json`: rewritten on every phase change, on progress at most every `progress_every_s`,
    and at least every `interval_s` (heartbeat).

    A background thread also polls the `cancel` marker and uploads the trainer log and TensorBoard
    events periodically. Only the main process of a multi-process run reports (`enabled`).
    """

    def __init__(self, store: Store, *, attempt: int, interval_s: float = 10.0, enabled: bool = True,
                 log_path: str | None = None, tensorboard_dir: str | None = None,
                 upload_logs_every_s: float = 30.0, progress_every_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.enabled, self.interval_s, self.clock = store, enabled, interval_s, clock
        self.progress_every_s = progress_every_s
        self.log_path, self.tensorboard_dir, self.upload_logs_every_s = log_path, tensorboard_dir, upload_logs_every_s
        now = clock()
        self.status = JobStatus(phase="preparing", revision=0, attempt=attempt, heartbeat_at=now,
                                started_at=now, updated_at=now, progress=Progress())
        self.cancel_requested = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log_upload = 0.0
        self._tb_uploaded: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        try:  # continue the revision sequence of earlier attempts (SSE ids must only grow)
            previous = self.store.get_json(STATUS_KEY, JobStatus)
            self.status = msgspec.structs.replace(self.status, revision=previous.revision)
        except NotFound:
            pass
        except (StorageError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("could not read the previous status.json (%s); starting a new revision sequence", exc)
        self._write(force=True)
        self._thread = threading.Thread(target=self._run, name="lathe-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._tick()

    def _tick(self) -> None:
        self._write()
        try:
            if not self.cancel_requested and self.store.exists(CANCEL_KEY):
                log.info("cancel marker found: stopping at the next step")
                self.cancel_requested = True
        except StorageError as exc:
            log.warning("could not poll the cancel marker: %s", exc)
        if self.clock() - self._last_log_upload >= self.upload_logs_every_s:
            self.upload_logs()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- updates -----------------------------------------------------------------------------
    def _update(self, **changes: Any) -> None:
        with self._lock:
            self.status = msgspec.structs.replace(self.status, **changes)

    def set_phase(self, phase: str) -> None:
        log.info("phase: %s", phase)  # in the log too, so it reads as the status did
        self._update(phase=phase)
        self._write(force=True)

    def progress(self, **fields: Any) -> None:
        """New progress; the status thread writes it when the last write is `progress_every_s` old
        (clients follow steps and loss live; training never waits on the store)."""
        with self._lock:
            self.status = msgspec.structs.replace(
                self.status, progress=msgspec.structs.replace(self.status.progress, **fields))
            due = self.clock() - self.status.updated_at >= self.progress_every_s
        if due:
            self._wake.set()

    def warn(self, message: str) -> None:
        with self._lock:
            self.status = msgspec.structs.replace(self.status, warnings=[*self.status.warnings, message])

    def set_outputs(self, outputs: list[OutputFile]) -> None:
        self._update(outputs=outputs)

    def finish(self, phase: str, *, reason: str | None = None, message: str | None = None) -> None:
        """The attempt's terminal state; retried through an outage (losing it would misreport the job).
        The log is uploaded after its last line and before the status: once the service sees the end,
        the stored log (what it serves for a finished job) is complete."""
        error = ErrorInfo(reason=reason, message=message or "") if reason else None
        log.info("phase: %s%s", phase, f" ({reason})" if reason else "")
        self._update(phase=phase, error=error)
        self.close()
        if not self.enabled:
            return
        self.upload_logs()
        with_retries(lambda: self._write(force=True, raise_errors=True), what="writing the final status.json")

    def _write(self, *, force: bool = False, raise_errors: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self.clock()
            self.status = msgspec.structs.replace(self.status, revision=self.status.revision + 1,
                                                  heartbeat_at=now, updated_at=now)
            payload = self.status
        try:
            self.store.put_json(STATUS_KEY, payload)
        except StorageError as exc:
            if raise_errors:
                raise
            log.warning("status.json write failed (%s); retrying on the next heartbeat", exc)

    def upload_logs(self) -> None:
        """Trainer log and new/changed TensorBoard event files; best effort until the end."""
        if not self.enabled:
            return
        self._last_log_upload = self.clock()
        try:
            if self.log_path and os.path.exists(self.log_path):
                self.store.upload_file(self.log_path, LOG_KEY)
            if self.tensorboard_dir and os.path.isdir(self.tensorboard_dir):
                root = Path(self.tensorboard_dir)
                for path in sorted(root.rglob("*")):
                    if not path.is_file():
                        continue
                    rel = path.relative_to(root).as_posix()
                    size = path.stat().st_size
                    if self._tb_uploaded.get(rel) == size:
                        continue
                    self.store.upload_file(str(path), TENSORBOARD_PREFIX + rel)
                    self._tb_uploaded[rel] = size
        except StorageError as exc:
            log.warning("log upload failed (%s); retrying later", exc)


class ManifestEntry(msgspec.Struct):
    size: int
    sha256: str


class Manifest(msgspec.Struct):
    step: int
    created_at: float
    attempt: int
    files: dict[str, ManifestEntry]


class Checkpoints:
    """Resumable training state under `checkpoints/<step>/`, valid only once its manifest exists.

    The manifest is written last, so a checkpoint cut off by SIGKILL or an outage is never resumed
    from; older checkpoints are pruned only after a newer one is valid.
    """

    def __init__(self, store: Store, *, keep: int = 2) -> None:
        self.store, self.keep = store, keep

    @staticmethod
    def prefix(step: int) -> str:
        return f"{CHECKPOINTS_PREFIX}{step:09d}/"

    def save(self, local_dir: str, step: int, *, attempt: int) -> Manifest:
        root = Path(local_dir)
        files: dict[str, ManifestEntry] = {}
        prefix = self.prefix(step)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            files[rel] = ManifestEntry(size=path.stat().st_size, sha256=sha256_file(path))
            with_retries(lambda p=path, r=rel: self.store.upload_file(str(p), prefix + r),
                         what=f"uploading checkpoint file {rel}")
        manifest = Manifest(step=step, created_at=time.time(), attempt=attempt, files=files)
        with_retries(lambda: self.store.put_json(prefix + MANIFEST_NAME, manifest), what="writing the checkpoint manifest")
        self.prune()
        return manifest

    def valid_steps(self) -> list[int]:
        steps = []
        for info in self.store.list(CHECKPOINTS_PREFIX):
            rel = info.key[len(CHECKPOINTS_PREFIX):] if info.key.startswith(CHECKPOINTS_PREFIX) else info.key
            head, _, name = rel.partition("/")
            if name == MANIFEST_NAME and head.isdigit():
                steps.append(int(head))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = with_retries(self.valid_steps, what="listing checkpoints")
        return steps[-1] if steps else None

    def download(self, step: int, local_dir: str) -> Manifest:
        prefix = self.prefix(step)
        manifest = with_retries(lambda: self.store.get_json(prefix + MANIFEST_NAME, Manifest), what="reading a checkpoint manifest")
        for rel, entry in manifest.files.items():
            dest = Path(local_dir) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with_retries(lambda r=rel, d=dest: self.store.download_file(prefix + r, str(d)), what=f"downloading checkpoint file {rel}")
            if dest.stat().st_size != entry.size or sha256_file(dest) != entry.sha256:
                raise JobFailure(Reason.STORAGE_ERROR, f"checkpoint {step} file {rel} does not match its manifest")
        return manifest

    def prune(self) -> None:
        try:
            steps = self.valid_steps()
            keep = set(steps[-self.keep:])
            newest = steps[-1] if steps else None
            stale: set[str] = set()
            for info in self.store.list(CHECKPOINTS_PREFIX):
                head = info.key[len(CHECKPOINTS_PREFIX):].partition("/")[0]
                if not head.isdigit():
                    continue
                step = int(head)
                # Old valid checkpoints beyond `keep`, and incomplete ones older than the newest valid one.
                if step not in keep and newest is not None and step < newest:
                    stale.add(self.prefix(step))
            for prefix in sorted(stale):
                self.store.delete_prefix(prefix)
        except StorageError as exc:
            log.warning("checkpoint pruning failed (%s); will retry after the next checkpoint", exc)
