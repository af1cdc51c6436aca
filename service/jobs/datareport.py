"""The dataset report's reads: list the dataset, read image headers (sizes), caption files, and
the images themselves for the near-duplicate check; `trainer.core.dataset.report` computes the report.

Bounded like the preflight: the preflight's file limit, caption files up to `caption_bytes`, and
the duplicate check decodes at most `hash_images` images of at most `hash_bytes` each (the others
are named in `not_hashed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from service.api import errors
from service.jobs.preflight import PreflightLimits, open_source
from service.api.wire import DatasetReportRequest, FieldProblem
from trainer.core.archives import STREAMED_ARCHIVE_SUFFIXES
from trainer.core.dataset.phash import dhash
from trainer.core.dataset.report import DatasetReport, build_report
from trainer.core.failures import JobFailure
from trainer.core.images import IMAGE_EXTENSIONS, UnreadableImage, image_size
from trainer.core.spec import DatasetSpec
from trainer.core.storage import StorageError, Store, open_store

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ReportLimits:
    preflight: PreflightLimits = PreflightLimits()
    caption_bytes: int = 64 * 1024  # per caption file (the rest of a longer one is not read)
    captions_total_bytes: int = 64 * 1024 * 1024
    hash_images: int = 1000
    hash_bytes: int = 16 * 1024 * 1024  # per image
    hash_total_bytes: int = 1024 * 1024 * 1024


def dataset_spec(req: DatasetReportRequest) -> DatasetSpec:
    return DatasetSpec(uri=req.uri, resolution=req.resolution, caption_extension=req.caption_extension,
                       enable_bucket=req.enable_bucket, min_bucket_reso=req.min_bucket_reso,
                       max_bucket_reso=req.max_bucket_reso, bucket_reso_steps=req.bucket_reso_steps,
                       bucket_no_upscale=req.bucket_no_upscale)


def run_report(req: DatasetReportRequest, limits: ReportLimits = ReportLimits(),
               opener: Callable[[str], Store] = open_store) -> DatasetReport:
    """The report of `req.uri`. Raises PreflightFailed (422) for a dataset that cannot be read or
    holds no training image, Unavailable when the store cannot be reached."""
    if req.uri.lower().endswith(STREAMED_ARCHIVE_SUFFIXES):
        raise errors.PreflightFailed(
            "compressed tar archives are not inspected in place", problems=[FieldProblem(path="uri", message=(
                f"{req.uri} is a compressed tar archive: use a folder or a .zip/.tar to get a report"))])
    problems: list[FieldProblem] = []
    source = open_source(req.uri, "uri", opener, limits.preflight, problems)
    if source is None:
        raise errors.PreflightFailed(f"cannot report on {req.uri}: {problems[0].message}", problems=problems)
    ds = dataset_spec(req)
    images = [n for n in source.names if n.lower().endswith(IMAGE_EXTENSIONS)]
    ext = req.caption_extension.lower()
    all_captions = [n for n in source.names if ext and n.lower().endswith(ext)]
    caption_files = _within_budget(all_captions, source.sizes, limits.caption_bytes, limits.captions_total_bytes)
    pool_map = _mapper(source.parallel, limits.preflight.workers)

    def size_of(path: str) -> tuple[int, int] | None:
        try:
            size = image_size(lambda n: source.read(path, n), source.sizes.get(path, 0), limits.preflight.header_bytes)
        except UnreadableImage:
            return None
        return size if size[0] * size[1] <= limits.preflight.max_image_pixels else None

    def caption_of(path: str) -> str | None:
        try:
            return source.read(path, limits.caption_bytes).decode("utf-8-sig", errors="replace")
        except UnreadableImage:  # a damaged archive member: counted as no caption
            return None

    try:
        sizes = dict(zip(images, pool_map(size_of, images)))
        captions = {p: t for p, t in zip(caption_files, pool_map(caption_of, caption_files)) if t is not None}
        hashes, not_hashed = (_hashes(images, sizes, source, limits, pool_map) if req.duplicates else (None, None))
        report = build_report(ds, source.names, sizes, captions=captions, hashes=hashes, not_hashed=not_hashed,
                              subject=req.subject, epochs=req.epochs)
        if len(caption_files) < len(all_captions):
            report.warnings.append(
                f"only {len(caption_files)} of {len(all_captions)} caption files were read (the report reads "
                f"{limits.captions_total_bytes // 2**20} MiB of captions at most): tag_frequency is partial")
        return report
    except JobFailure as exc:
        raise errors.PreflightFailed(exc.message, problems=[FieldProblem(path="uri", message=exc.message)]) from None
    except StorageError as exc:
        raise errors.Unavailable(f"cannot read {req.uri}: {exc}") from None


def _hashes(images: list[str], sizes: dict[str, tuple[int, int] | None], source, limits: ReportLimits,
            pool_map) -> tuple[dict[str, int], list[str]]:
    readable = [p for p in images if sizes.get(p) is not None]
    small = [p for p in readable if source.sizes.get(p, 0) <= limits.hash_bytes]
    chosen = _within_budget(small, source.sizes, limits.hash_bytes, limits.hash_total_bytes)[:limits.hash_images]
    picked = set(chosen)
    not_hashed = [p for p in readable if p not in picked]

    def one(path: str) -> int | None:
        try:
            return dhash(source.read(path, max(source.sizes.get(path, 0), 1)))
        except (ValueError, UnreadableImage):
            return None

    hashes: dict[str, int] = {}
    for path, value in zip(chosen, pool_map(one, chosen)):
        if value is None:
            not_hashed.append(path)
        else:
            hashes[path] = value
    return hashes, not_hashed


def _within_budget(names: list[str], sizes: dict[str, int], each: int, total: int) -> list[str]:
    """The first names whose reads (each at most `each` bytes) fit in `total` bytes."""
    out, used = [], 0
    for name in names:
        used += min(sizes.get(name, 0), each)
        if used > total:
            break
        out.append(name)
    return out


def _mapper(parallel: bool, workers: int) -> Callable[[Callable[[T], R], Iterable[T]], list[R]]:
    """map over a thread pool for stores that take concurrent reads; in order for one archive handle."""
    def run(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if not parallel or len(items) < 2:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="lathe-report") as pool:
            return list(pool.map(fn, items))
    return run
