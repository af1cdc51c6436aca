"""Dataset preflight, before any GPU time: list the dataset in the object store, read each image's
header with a ranged GET, and predict what the trainer will see.

The rules are the trainer's own (torch-free modules): `trainer.core.dataset.layout.discover_layout` decides
concepts, repeats and caption pairing; `trainer.core.dataset.plan.plan_epoch` the buckets, batches and steps.
Problems that would fail the run are errors (422); the rest come back as warnings.
"""

from __future__ import annotations

import errno
import io
import lzma
import math
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.api.errors import Unavailable
from service.api.wire import BucketReport, ConceptReport, FieldProblem, PreflightReport
from trainer.core.archives import SEEKABLE_ARCHIVE_SUFFIXES, STREAMED_ARCHIVE_SUFFIXES, is_junk, member_refusal, unsafe_names
from trainer.core.dataset.buckets import BucketParams
from trainer.core.dataset.layout import DatasetLayout, DatasetParams, discover_layout
from trainer.core.dataset.plan import EpochPlan, plan_epoch
from trainer.core.dataset.report import size_guidance
from trainer.core.failures import JobFailure, Reason
from trainer.core.images import MAX_IMAGE_PIXELS, ImageTooLarge, UnreadableImage, image_size
from trainer.core.spec import JobSpec, total_steps
from trainer.core.storage import NotFound, StorageError, Store, open_store, parse_uri

SHOWN = 5  # file names quoted per kind of problem; counts are exact
# What reading one damaged archive member raises: bad CRC or local header, corrupt deflate data,
# encryption (RuntimeError), an unsupported compression method, data cut short.
_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError, tarfile.TarError,
                  lzma.LZMAError, OSError)


@dataclass(frozen=True)
class PreflightLimits:
    max_files: int = 20000
    workers: int = 16
    header_bytes: int = 64 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS


class _Source:
    """The files of a dataset (folder prefix or archive) and a way to read each one's first bytes."""

    def __init__(self, names: list[str], sizes: dict[str, int], read: Callable[[str, int], bytes],
                 parallel: bool) -> None:
        self.names, self.sizes, self.read, self.parallel = names, sizes, read, parallel


def run_preflight(spec: JobSpec, limits: PreflightLimits = PreflightLimits(),
                  opener: Callable[[str], Store] = open_store) -> PreflightReport:
    """The report for `spec`'s dataset. Raises Unavailable when the store cannot be reached."""
    uri = spec.dataset.uri
    problems: list[FieldProblem] = []
    warnings: list[FieldProblem] = []
    report = PreflightReport(dataset_uri=uri, files_listed=0, images=0,
                             batch_size=spec.training.batch_size)
    lowered = uri.lower()
    if lowered.endswith(STREAMED_ARCHIVE_SUFFIXES):
        report.checked = False
        report.warnings = [FieldProblem(path="dataset.uri", severity="warning", message=(
            "compressed tar archives are not inspected before launch (that would mean downloading them); "
            "the trainer checks the dataset when it starts. Use a folder or a .zip/.tar to get the report now"))]
        return report
    train = open_source(uri, "dataset.uri", opener, limits, problems)
    reg = open_source(spec.dataset.reg_uri, "dataset.reg_uri", opener, limits, problems) if spec.dataset.reg_uri else None
    if train is None or (spec.dataset.reg_uri and reg is None):
        report.problems = problems
        return report
    report.files_listed = len(train.names) + (len(reg.names) if reg else 0)

    try:
        layout = discover_layout(spec, train.names, reg.names if reg else None)
    except JobFailure as exc:
        path = "dataset.config_toml" if exc.reason == Reason.SPEC_INVALID and spec.dataset.config_toml else (
            "dataset.subsets" if exc.reason == Reason.SPEC_INVALID else "dataset.uri")
        report.problems = [*problems, FieldProblem(path=path, message=exc.message)]
        return report
    warnings += [FieldProblem(path="dataset", message=w, severity="warning") for w in layout.warnings]
    report.unpaired_captions = layout.unpaired_captions[:SHOWN]
    report.unpaired_captions_count = len(layout.unpaired_captions)
    report.unsupported_files = layout.unsupported[:SHOWN]
    report.unsupported_files_count = len(layout.unsupported)

    sizes = _read_sizes(layout, train, reg, limits, problems)
    report.images = layout.num_images
    report.concepts = [
        ConceptReport(name=s.name, image_dir=s.image_dir, repeats=s.num_repeats, images=len(s.images),
                      is_reg=s.is_reg, without_caption=sum(1 for im in s.images if im.caption_path is None))
        for s in layout.subsets
    ]
    if any(p.severity == "error" for p in problems):
        report.problems, report.warnings = problems, warnings
        return report

    _plan(spec, layout, sizes, report, problems, warnings)
    report.problems, report.warnings = problems, warnings
    return report


# ------------------------------------------------------------------------------------- listing


def open_source(uri: str, field: str, opener: Callable[[str], Store], limits: PreflightLimits,
                problems: list[FieldProblem]) -> _Source | None:
    try:
        parse_uri(uri)
    except ValueError as exc:
        problems.append(FieldProblem(path=field, message=str(exc)))
        return None
    try:
        if uri.lower().endswith(SEEKABLE_ARCHIVE_SUFFIXES):
            return _archive_source(uri, field, opener, limits, problems)
        store = opener(uri if uri.endswith("/") else uri + "/")
        names: list[str] = []
        sizes: dict[str, int] = {}
        for info in store.list("", limit=limits.max_files + 1):
            if info.key.endswith("/"):
                continue
            names.append(info.key)
            sizes[info.key] = info.size
        # S3 keys may hold '..' segments; the trainer refuses them when it downloads (dataset_invalid),
        # so say so now rather than after a launch.
        escaping = unsafe_names(names)
        if escaping:
            problems.append(FieldProblem(path=field, message=(
                f"{uri} has objects whose names climb out of it ({', '.join(escaping[:SHOWN])}); the trainer "
                "refuses them: rename or delete them")))
            return None
        if len(names) > limits.max_files:
            problems.append(FieldProblem(path=field, message=(
                f"{uri} holds more than {limits.max_files} files, the most a preflight lists; split the dataset "
                "or ask the operator to raise LATHE_PREFLIGHT_MAX_FILES")))
            return None
        if not names:
            problems.append(FieldProblem(path=field, message=(
                f"nothing found under {uri}: upload the dataset there (POST /v1/uploads or `lathe upload DIR`) "
                "or fix the URI")))
            return None
        return _Source(names, sizes, lambda name, n: store.get_range(name, 0, n), parallel=True)
    except NotFound:
        problems.append(FieldProblem(path=field, message=f"{uri} does not exist (bucket or object not found)"))
        return None
    except StorageError as exc:
        raise Unavailable(f"cannot read {field} {uri}: {exc}") from None


def _archive_source(uri: str, field: str, opener: Callable[[str], Store], limits: PreflightLimits,
                    problems: list[FieldProblem]) -> _Source | None:
    """The members of a .zip/.tar, read through ranged GETs; None (with the problem) when the trainer
    would refuse the archive: unreadable, links or special files, names outside its root, too many files."""
    scheme, bucket, key = parse_uri(uri)
    parent, _, name = key.rpartition("/")
    store = opener(f"s3://{bucket}/{parent}/" if scheme == "s3" else (parent or "/") + "/")
    info = store.head(name)
    reader = _RangeFile(store, name, info.size)
    try:
        opened = _zip_members(reader) if uri.lower().endswith(".zip") else _tar_members(reader)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, NotImplementedError, ValueError, IndexError,
            OSError) as exc:
        # Besides the plain "not an archive": a zip version or method zipfile cannot read, a name flagged
        # UTF-8 that is not (UnicodeDecodeError), an empty member name (IndexError), an offset before the
        # start of the file (OSError from _RangeFile.seek).
        problems.append(FieldProblem(path=field, message=f"{uri} is not a readable archive: {exc}"))
        return None
    members, sizes, read = opened
    # Links and special files are refused by the trainer's extraction; without this check a link named
    # .txt would pass the preflight (read as a caption) and fail the run.
    refused = [n for n, m in members if not is_junk(n) and member_refusal(m)]
    if refused:
        problems.append(FieldProblem(path=field, message=(
            f"archive {uri} holds links or special files ({', '.join(refused[:SHOWN])}), which are "
            "refused; store regular files instead")))
        return None
    names = list(sizes)
    escaping = unsafe_names(names)
    if escaping:
        problems.append(FieldProblem(path=field, message=(
            f"archive {uri} has members outside its root ({', '.join(escaping[:SHOWN])}); rebuild it with relative paths")))
        return None
    if len(names) > limits.max_files:
        problems.append(FieldProblem(path=field, message=f"archive {uri} holds more than {limits.max_files} files"))
        return None
    return _Source(names, sizes, read, parallel=False)  # one archive handle: sequential reads


_Members = tuple[list[tuple[str, zipfile.ZipInfo | tarfile.TarInfo]], dict[str, int], Callable[[str, int], bytes]]


def _zip_members(reader: io.RawIOBase) -> _Members:
    """(every member with its name, the files' sizes, a reader of a file's first bytes)."""
    archive = zipfile.ZipFile(reader)
    files = {m.filename: m for m in archive.infolist() if not m.is_dir()}

    def read(member: str, n: int) -> bytes:
        try:
            with archive.open(files[member]) as fh:
                return fh.read(n)
        except _MEMBER_ERRORS as exc:  # a damaged member: the problem names it
            raise UnreadableImage(f"cannot be read from the archive: {type(exc).__name__}: {exc}") from None

    return [(m.filename, m) for m in archive.infolist()], {n: m.file_size for n, m in files.items()}, read


def _tar_members(reader: io.RawIOBase) -> _Members:
    """As `_zip_members`, for an uncompressed tar."""
    tar = tarfile.open(fileobj=reader, mode="r:")
    files = {m.name: m for m in tar.getmembers() if m.isfile()}

    def read(member: str, n: int) -> bytes:
        try:
            fh = tar.extractfile(files[member])
            return fh.read(n) if fh is not None else b""
        except _MEMBER_ERRORS as exc:
            raise UnreadableImage(f"cannot be read from the archive: {type(exc).__name__}: {exc}") from None

    return [(m.name, m) for m in tar.getmembers()], {n: m.size for n, m in files.items()}, read


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of one object through ranged GETs (zipfile/tarfile read the
    directory and member headers; only those bytes travel). Reads are aligned to blocks and cached."""

    BLOCK = 256 * 1024

    def __init__(self, store: Store, key: str, size: int) -> None:
        self.store, self.key, self.size, self.pos = store, key, size, 0
        self._cache: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            # As a real file does. Clamping to 0 made a zip whose directory puts a member before the
            # file's start read the first member instead: the preflight passed what the trainer refuses.
            raise OSError(errno.EINVAL, "seek to a negative position")
        self.pos = base + offset
        return self.pos

    def _block(self, index: int) -> bytes:
        if index not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            start = index * self.BLOCK
            self._cache[index] = self.store.get_range(self.key, start, min(self.BLOCK, self.size - start))
        return self._cache[index]

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        view = memoryview(buffer)
        n = min(len(view), self.size - self.pos)
        done = 0
        while done < n:
            index, offset = divmod(self.pos, self.BLOCK)
            chunk = self._block(index)[offset:offset + n - done]
            if not chunk:
                break
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done


# ------------------------------------------------------------------------------------- headers


def _read_sizes(layout: DatasetLayout, train: _Source, reg: _Source | None, limits: PreflightLimits,
                problems: list[FieldProblem]) -> dict[tuple[str, str], tuple[int, int] | None]:
    """(root, path) → (w, h) for every image of the layout; None when unreadable or too large."""
    wanted = [(s.root, im.path) for s in layout.subsets for im in s.images]
    wanted = list(dict.fromkeys(wanted))

    def one(item: tuple[str, str]) -> tuple[tuple[str, str], tuple[int, int] | str]:
        root, path = item
        source = train if root == "train" else reg
        assert source is not None
        try:
            size = image_size(lambda n: source.read(path, n), source.sizes.get(path, 0), limits.header_bytes)
        except ImageTooLarge as exc:
            return item, f"is over the limit of {limits.max_image_pixels} pixels ({exc}); downscale it"
        except UnreadableImage as exc:
            return item, f"not a readable image ({exc}); fix or remove it"
        except StorageError as exc:
            raise Unavailable(f"cannot read {path}: {exc}") from None
        if size[0] * size[1] > limits.max_image_pixels:
            return item, (f"is {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over the limit of "
                          f"{limits.max_image_pixels}; downscale it")
        return item, size

    results: Iterator[tuple[tuple[str, str], tuple[int, int] | str]]
    if train.parallel and (reg is None or reg.parallel) and len(wanted) > 1:
        with ThreadPoolExecutor(min(limits.workers, len(wanted)), thread_name_prefix="lathe-preflight") as pool:
            results = iter(list(pool.map(one, wanted)))
    else:
        results = map(one, wanted)
    sizes: dict[tuple[str, str], tuple[int, int] | None] = {}
    bad: list[tuple[str, str, str]] = []
    for item, value in results:
        if isinstance(value, str):
            sizes[item] = None
            bad.append((item[0], item[1], value))
        else:
            sizes[item] = value
    for root, path, message in bad[:SHOWN]:
        field = "dataset.uri" if root == "train" else "dataset.reg_uri"
        problems.append(FieldProblem(path=f"{field}:{path}", message=message))
    if len(bad) > SHOWN:
        problems.append(FieldProblem(path="dataset.uri", message=f"{len(bad) - SHOWN} more images cannot be used"))
    return sizes


# ---------------------------------------------------------------------------------------- plan


def _plan(spec: JobSpec, layout: DatasetLayout, sizes: dict[tuple[str, str], tuple[int, int] | None],
          report: PreflightReport, problems: list[FieldProblem], warnings: list[FieldProblem]) -> None:
    """Buckets, batches and steps as the trainer's dataset will plan them (`plan_epoch`)."""
    datasets = layout.datasets or [DatasetParams(BucketParams.from_spec(spec))]
    plan = plan_epoch(layout.subsets, datasets, [[sizes.get((s.root, im.path)) for im in s.images]
                                                 for s in layout.subsets])
    _report_unusable(plan, problems)
    batch_size = spec.training.batch_size
    buckets: dict[tuple[int, int], list[int]] = {}
    for b in plan.buckets:
        acc = buckets.setdefault(b.reso, [0, 0, 0])
        acc[0] += b.images
        acc[1] += b.image_steps
        acc[2] += plan.bucket_batches(b, batch_size)
    report.buckets = [BucketReport(width=w, height=h, images=v[0], image_steps=v[1], batches=v[2])
                      for (w, h), v in sorted(buckets.items())]
    report.image_steps_per_epoch = sum(b.image_steps for b in plan.buckets)
    report.batches_per_epoch = plan.batches_per_epoch(batch_size)
    report.smaller_than_resolution = small = _smaller_than_resolution(plan)
    processes = max(1, spec.resources.gpus) * spec.resources.nodes
    report.steps_per_epoch = plan.steps_per_epoch(batch_size, processes, spec.training.gradient_accumulation_steps)
    if report.steps_per_epoch == 0:
        problems.append(FieldProblem(path="dataset.uri", message="no usable training image: nothing to train on"))
        return
    report.total_steps = total_steps(spec, report.steps_per_epoch)
    report.epochs = math.ceil(report.total_steps / report.steps_per_epoch)
    warnings += _plan_warnings(spec, layout, report, small)


def _report_unusable(plan: EpochPlan, problems: list[FieldProblem]) -> None:
    """Images smaller than one bucket step (bucket_no_upscale): one problem per dataset holding any."""
    by_dataset: dict[int, list[tuple[int, int]]] = {}
    for u in plan.unusable:
        by_dataset.setdefault(plan.subsets[u.subset].dataset, []).append(u.size)
    for d in sorted(by_dataset):
        dims = by_dataset[d]
        shown = ", ".join(f"{w}x{h}" for w, h in dims[:SHOWN])
        problems.append(FieldProblem(path="dataset.bucket_no_upscale", message=(
            f"{len(dims)} image(s) are smaller than one bucket step ({shown}) and would get an empty "
            "bucket: remove them, lower dataset.bucket_reso_steps or disable bucket_no_upscale")))


def _smaller_than_resolution(plan: EpochPlan) -> int:
    """Planned images (training and regularisation) that will be upscaled: smaller than the
    resolution in area and on some side (bucket_no_upscale never upscales)."""
    small = 0
    for im in plan.images:
        params = plan.datasets[plan.subsets[im.subset].dataset].buckets
        rw, rh = params.resolution
        w, h = im.size
        if not params.no_upscale and w * h < rw * rh and (w < rw or h < rh):
            small += 1
    return small


def _plan_warnings(spec: JobSpec, layout: DatasetLayout, report: PreflightReport, small: int) -> list[FieldProblem]:
    """Dataset size against the guides' figures, upscaled images, partly filled batches."""
    warnings: list[FieldProblem] = []
    # The guides' size figures (the report's rule); the preflight knows no subject, so only what is
    # outside both the character and the style range is named.
    train_steps = layout.image_steps_per_epoch
    warnings += [FieldProblem(path="dataset", severity="warning", message=m) for m in size_guidance(
        sum(len(s.images) for s in layout.subsets if not s.is_reg), train_steps, train_steps * report.epochs, None)]
    if small:
        w, h = spec.dataset.resolution_wh
        warnings.append(FieldProblem(path="dataset.resolution", severity="warning", message=(
            f"{small} image(s) are smaller than the training resolution {w}x{h} and will be upscaled (blurry "
            "results); use larger images, a lower resolution, or dataset.bucket_no_upscale with enable_bucket")))
    if spec.training.batch_size > 1 and len(report.buckets) > 1:
        partial = sum(1 for b in report.buckets if b.image_steps % spec.training.batch_size)
        if partial:
            warnings.append(FieldProblem(path="training.batch_size", severity="warning", message=(
                f"{partial} of {len(report.buckets)} buckets do not fill their last batch of "
                f"{spec.training.batch_size}; those batches are smaller")))
    return warnings
