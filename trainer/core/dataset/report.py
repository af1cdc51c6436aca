"""What a dataset holds, before training: images per concept folder, sizes, aspect ratios and
buckets, tag frequencies, images without captions, caption files without images, near-duplicate
images, and the guides' rough size guidance as warnings.

PURE and torch-free: the caller gathers the inputs (a file listing, image sizes from headers, the
caption files' text, perceptual hashes) and this module only computes. Discovery, buckets and tag
counting are the trainer's own (`layout`, `buckets`, `captions`), so the report says what a
training job on the same dataset settings would see.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Literal

import msgspec

from trainer.core.dataset.buckets import Bucketer, Size
from trainer.core.dataset.captions import tag_frequency
from trainer.core.dataset.layout import discover_layout
from trainer.core.dataset.phash import NEAR_DUPLICATE_BITS, near_duplicate_groups

Subject = Literal["character", "style"]

# The guides' rough figures (warnings, never errors): images in the set, image-steps (images ×
# repeats) per epoch, and image-steps over the whole run, before dividing by the batch size.
GUIDANCE: dict[str, dict[str, tuple[int, int]]] = {
    "character": {"images": (50, 100), "per_epoch": (300, 600), "total": (2000, 7000)},
    "style": {"images": (75, 150), "per_epoch": (300, 600), "total": (8000, 12000)},
}
SHOWN = 20  # paths listed per kind of finding in the warnings; the report's lists are complete


class ImageInfo(msgspec.Struct, kw_only=True):
    path: str
    width: int | None = None  # None: the header could not be read
    height: int | None = None
    aspect: float | None = None  # width / height
    bucket: list[int] | None = None  # [w, h] at the dataset's resolution and bucket settings
    caption: str | None = None  # caption file path; None when the image has none (or an empty one, when read)


class ConceptInfo(msgspec.Struct, kw_only=True):
    name: str  # folder name (`10_mychar`), as ss_tag_frequency keys it
    image_dir: str
    repeats: int
    images: int
    image_steps: int  # images × repeats
    without_caption: int
    class_tokens: str | None = None  # the caption of its images without a caption file


class BucketCount(msgspec.Struct, kw_only=True):
    width: int
    height: int
    images: int


class DatasetReport(msgspec.Struct, kw_only=True):
    """The dataset report (the API's and `lathe dataset report`'s answer)."""

    uri: str
    files_listed: int
    images: int
    resolution: list[int]
    enable_bucket: bool
    image_steps_per_epoch: int
    total_image_steps: int | None = None  # with `epochs`
    concepts: list[ConceptInfo] = []
    buckets: list[BucketCount] = []
    image_list: list[ImageInfo] = []
    tag_frequency: dict[str, dict[str, int]] | None = None  # ss_tag_frequency; None: captions not read
    without_caption: list[str] = []
    orphan_captions: list[str] = []  # caption files with no image of the same name
    unreadable: list[str] = []
    duplicates: list[list[str]] | None = None  # near-duplicate groups; None: not checked
    duplicate_max_bits: int = NEAR_DUPLICATE_BITS
    hashed: int = 0
    not_hashed: list[str] = []  # images left out of the duplicate check (over the limits, undecodable)
    warnings: list[str] = []


def build_report(ds, files: list[str], sizes: Mapping[str, Size | None], *,
                 captions: Mapping[str, str] | None = None, hashes: Mapping[str, int] | None = None,
                 not_hashed: list[str] | None = None, subject: Subject | None = None,
                 epochs: int | None = None) -> DatasetReport:
    """The report of the dataset `ds` (a `DatasetSpec`: uri, layout and bucket settings) listed as
    `files` (relative paths). `sizes` maps image paths to (w, h) (None: unreadable); `captions`
    maps caption file paths to their text and `hashes` image paths to dHashes (None: not read).

    Raises JobFailure(dataset_invalid) when no training image is found (as the preflight does)."""
    layout = discover_layout(SimpleNamespace(dataset=ds), files)
    bucketers = [Bucketer(d.buckets) for d in layout.datasets]
    params = layout.datasets[0].buckets
    images: list[ImageInfo] = []
    concepts: list[ConceptInfo] = []
    bucket_counts: dict[Size, int] = {}
    unreadable: list[str] = []
    freq: dict[str, dict[str, int]] = {}
    for sub in layout.subsets:
        texts: list[str] = []
        found = [_image_info(im, sizes.get(im.path), bucketers[sub.dataset], bucket_counts) for im in sub.images]
        for im, info in zip(sub.images, found):
            if info.width is None:
                unreadable.append(im.path)
            if captions is not None and (im.caption_path is None or im.caption_path in captions):
                texts.append(_read_caption(info, captions, sub.class_tokens))
        images += found
        if captions is not None:
            freq.setdefault(sub.name, {}).update(tag_frequency(texts))
        concepts.append(ConceptInfo(
            name=sub.name, image_dir=sub.image_dir, repeats=sub.num_repeats, images=len(sub.images),
            image_steps=len(sub.images) * sub.num_repeats, class_tokens=sub.class_tokens,
            without_caption=sum(info.caption is None for info in found)))

    per_epoch = layout.image_steps_per_epoch
    report = DatasetReport(
        uri=ds.uri, files_listed=len(files), images=layout.num_images, resolution=list(params.resolution),
        enable_bucket=params.enable_bucket, image_steps_per_epoch=per_epoch,
        total_image_steps=per_epoch * epochs if epochs else None, concepts=concepts,
        buckets=[BucketCount(width=w, height=h, images=n) for (w, h), n in sorted(bucket_counts.items())],
        image_list=images, tag_frequency=freq if captions is not None else None,
        without_caption=[im.path for im in images if im.caption is None],
        orphan_captions=list(layout.unpaired_captions), unreadable=unreadable,
        not_hashed=list(not_hashed or []),
    )
    if hashes is not None:
        report.duplicates = near_duplicate_groups(dict(hashes))
        report.hashed = len(hashes)
    report.warnings = list(layout.warnings) + _findings(report) + size_guidance(
        sum(len(s.images) for s in layout.subsets if not s.is_reg), per_epoch, report.total_image_steps, subject)
    return report


def _image_info(im, size: Size | None, bucketer: Bucketer, bucket_counts: dict[Size, int]) -> ImageInfo:
    """One image's entry; counts its bucket in `bucket_counts`. No size: unreadable."""
    info = ImageInfo(path=im.path, caption=im.caption_path)
    if size is not None:
        bucket, _ = bucketer.select(*size)
        info.width, info.height = size
        info.aspect = round(size[0] / size[1], 3)
        info.bucket = [bucket[0], bucket[1]]
        bucket_counts[bucket] = bucket_counts.get(bucket, 0) + 1
    return info


def _read_caption(info: ImageInfo, captions: Mapping[str, str], class_tokens: str | None) -> str:
    """The caption the trainer would use for `info` (clearing `info.caption` when the file is empty).

    As the trainer reads it: the first line, stripped; an empty file counts as none. The caller skips
    a caption file it did not read (over its budget), leaving it out of the counts."""
    text = captions[info.caption] if info.caption else ""
    first = (text.splitlines() or [""])[0].strip()
    if not first:
        info.caption = None
    return first or class_tokens or ""


def _listed(paths: list[str]) -> str:
    return ", ".join(paths[:SHOWN]) + (" …" if len(paths) > SHOWN else "")


def _findings(report: DatasetReport) -> list[str]:
    out = []
    if report.without_caption:
        out.append(f"{len(report.without_caption)} image(s) have no caption file (they train with their folder's "
                   f"class tokens): {_listed(report.without_caption)}")
    if report.unreadable:
        out.append(f"{len(report.unreadable)} image(s) could not be read: {_listed(report.unreadable)}")
    for group in report.duplicates or []:
        out.append(f"near-duplicate images (dHash within {report.duplicate_max_bits} bits): {', '.join(group)}")
    if report.not_hashed:
        out.append(f"{len(report.not_hashed)} image(s) were not checked for duplicates: {_listed(report.not_hashed)}")
    return out


def size_guidance(images: int, per_epoch: int, total: int | None, subject: Subject | None) -> list[str]:
    """The guides' size figures as warnings. Without a subject, only what falls outside both the
    character and the style range is named."""
    out: list[str] = []
    kinds = [subject] if subject else list(GUIDANCE)
    for key, value, what in (("images", images, "training images"),
                             ("per_epoch", per_epoch, "image-steps per epoch (images × repeats)"),
                             ("total", total, "image-steps in total (images × repeats × epochs)")):
        if value is None:
            continue
        ranges = {k: GUIDANCE[k][key] for k in kinds}
        low, high = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
        if low <= value <= high:
            continue
        said = " and ".join(f"{a}–{b} for a {k}" for k, (a, b) in ranges.items())
        direction = "fewer" if value < low else "more"
        out.append(f"{value} {what}: {direction} than the guides suggest ({said}); a rough figure, not a rule")
    return out
