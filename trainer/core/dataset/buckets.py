"""Aspect-ratio bucketing exactly as sd-scripts assigns it (`make_bucket_resolutions` and
`BucketManager` in its `library/`), reimplemented as pure functions.

Two modes, as in sd-scripts:
- predefined buckets (the default): every (w, h) with both sides multiples of `steps` between
  `min_reso` and `max_reso` and area ≤ resolution²; an image goes to the bucket with the closest
  aspect ratio (or to its own size when that is a bucket) and is resized to cover it, then cropped.
- `no_upscale`: the bucket derives from the image itself: shrunk to area ≤ resolution² only when
  larger, then each side cut down to a multiple of `steps` (cropping, never padding or upscaling).
Without bucketing everything goes to the single resolution bucket (resize to cover, then crop).

Torch-free: the service's preflight uses it to predict buckets and steps from image headers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketParams:
    """The bucketing settings of one dataset (`[[datasets]]` table or the spec's dataset)."""

    resolution: Size = (512, 512)
    enable_bucket: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False

    @classmethod
    def from_spec(cls, spec: Any) -> BucketParams:
        """From a `JobSpec` or its `DatasetSpec`."""
        ds = getattr(spec, "dataset", spec)
        return cls(ds.resolution_wh, ds.enable_bucket, ds.min_bucket_reso, ds.max_bucket_reso,
                   ds.bucket_reso_steps, ds.bucket_no_upscale)

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def make_buckets(resolution: Size | int, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """sd-scripts' predefined bucket list, sorted: the square bucket plus, for each width from
    `min_reso` to `max_reso` in `steps`, the tallest height (a multiple of `steps`, ≤ max_reso)
    whose area stays within resolution², and the transposed bucket."""
    w0, h0 = (resolution, resolution) if isinstance(resolution, int) else resolution
    max_area = w0 * h0
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // steps) * steps)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    """Round to the nearest integer, then down to a multiple of `steps` (sd-scripts' rounding)."""
    n = int(x + 0.5)
    return n - n % steps


def select_bucket(
    img_w: int,
    img_h: int,
    *,
    buckets: Sequence[Size] | None,
    max_area: int = 0,
    steps: int = 64,
    no_upscale: bool = False,
) -> tuple[Size, Size]:
    """(bucket (w, h), resized (w, h)) for one image. `buckets` is the predefined list (unused
    with `no_upscale`, where `max_area` and `steps` define the bucket). The resized size covers the
    bucket; the excess is cropped. A bucket side can be 0 when an image is smaller than `steps`
    with `no_upscale`: callers must treat that image as unusable."""
    aspect = img_w / img_h
    if not no_upscale:
        if not buckets:
            raise ValueError("select_bucket needs the predefined buckets unless no_upscale is set")
        reso = (img_w, img_h)
        if reso not in buckets:
            # First bucket with the smallest aspect-ratio error, in sorted order (numpy argmin's tie rule).
            best, best_err = buckets[0], math.inf
            for cand in buckets:
                err = abs(cand[0] / cand[1] - aspect)
                if err < best_err:
                    best, best_err = cand, err
            reso = best
        if aspect > reso[0] / reso[1]:  # image wider than the bucket: match heights, crop width
            scale = reso[1] / img_h
        else:
            scale = reso[0] / img_w
        resized = (int(img_w * scale + 0.5), int(img_h * scale + 0.5))
        return (reso[0], reso[1]), resized

    if img_w * img_h > max_area:
        # Shrink to the area budget keeping the aspect ratio; round whichever side keeps the
        # aspect ratio closer after rounding to steps.
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = round_to_steps(rw, steps)
        bh_for_w = round_to_steps(bw / aspect, steps)
        bh = round_to_steps(rh, steps)
        bw_for_h = round_to_steps(bh * aspect, steps)
        ar_w = bw / bh_for_w if bh_for_w else math.inf
        ar_h = bw_for_h / bh if bh else math.inf
        if abs(ar_w - aspect) < abs(ar_h - aspect):
            resized = (bw, int(bw / aspect + 0.5))
        else:
            resized = (int(bh * aspect + 0.5), bh)
    else:
        resized = (img_w, img_h)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return bucket, resized


def crop_ltrb(bucket: Size, original: Size) -> tuple[float, float, float, float]:
    """sd-scripts' crop (left, top, right, bottom) reported to SDXL's size conditioning: computed
    from the original aspect ratio fitted inside the bucket (Stability AI's preprocessing), not from
    the crop actually applied; random crops are not reflected (sd-scripts does the same)."""
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original[0] / original[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, float(bucket[1])
    else:
        rw, rh = float(bucket[0]), bucket[0] / image_ar
    left = (bucket[0] - rw) // 2
    top = (bucket[1] - rh) // 2
    return left, top, left + rw, top + rh


class Bucketer:
    """Assigns images to buckets under one `BucketParams` (precomputes the predefined list)."""

    def __init__(self, params: BucketParams) -> None:
        self.params = params
        if not params.enable_bucket:
            self.predefined: list[Size] | None = [params.resolution]
        elif params.no_upscale:
            self.predefined = None  # sd-scripts ignores min/max_bucket_reso here
        else:
            self.predefined = make_buckets(params.resolution, params.min_reso, params.max_reso, params.steps)

    def select(self, img_w: int, img_h: int) -> tuple[Size, Size]:
        p = self.params
        if not p.enable_bucket:
            return select_bucket(img_w, img_h, buckets=self.predefined)
        return select_bucket(img_w, img_h, buckets=self.predefined, max_area=p.max_area, steps=p.steps,
                             no_upscale=p.no_upscale)


@dataclass(frozen=True)
class BucketCount:
    reso: Size  # (w, h)
    images: int  # distinct images
    image_steps: int  # images × repeats: the samples this bucket yields per epoch
    batches: int  # ceil(image_steps / batch_size)


@dataclass(frozen=True)
class BucketPlan:
    buckets: list[BucketCount]  # sorted by resolution, only buckets that received images
    assignments: list[tuple[Size, Size]]  # per input size: (bucket, resized)
    mean_ar_error: float  # mean |bucket aspect − image aspect| over distinct images (0 without bucketing)
    enable_bucket: bool = True
    unusable: list[int] = field(default_factory=list)  # input indices whose bucket has a 0 side

    @property
    def batches_per_epoch(self) -> int:
        """What sd-scripts reports as `ss_num_batches_per_epoch` (len(train_dataloader)) for one process."""
        return sum(b.batches for b in self.buckets)

    @property
    def image_steps_per_epoch(self) -> int:
        return sum(b.image_steps for b in self.buckets)

    def bucket_info(self) -> dict[str, Any] | None:
        """sd-scripts' `ss_bucket_info` (None without bucketing, as sd-scripts writes it)."""
        if not self.enable_bucket:
            return None
        return {
            "buckets": {i: {"resolution": list(b.reso), "count": b.image_steps} for i, b in enumerate(self.buckets)},
            "mean_img_ar_error": self.mean_ar_error,
        }


def plan_buckets(
    sizes: Sequence[Size],
    spec: Any,
    batch_size: int,
    repeats: Sequence[int] | None = None,
) -> BucketPlan:
    """Bucket counts and batches per epoch for images of `sizes` (w, h), each repeated
    `repeats[i]` times (1 by default). `spec` is a `BucketParams`, `JobSpec` or `DatasetSpec`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    params = spec if isinstance(spec, BucketParams) else BucketParams.from_spec(spec)
    if repeats is not None and len(repeats) != len(sizes):
        raise ValueError(f"repeats has {len(repeats)} entries for {len(sizes)} sizes")
    bucketer = Bucketer(params)
    assignments: list[tuple[Size, Size]] = []
    per_bucket: dict[Size, list[int]] = {}
    ar_errors: list[float] = []
    unusable: list[int] = []
    for i, (w, h) in enumerate(sizes):
        bucket, resized = bucketer.select(w, h)
        assignments.append((bucket, resized))
        if bucket[0] <= 0 or bucket[1] <= 0:
            unusable.append(i)
            continue
        ar_errors.append(abs(bucket[0] / bucket[1] - w / h))
        counts = per_bucket.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += repeats[i] if repeats is not None else 1
    buckets = [
        BucketCount(reso, n, steps, math.ceil(steps / batch_size))
        for reso, (n, steps) in sorted(per_bucket.items())
        if steps > 0
    ]
    mean_err = sum(ar_errors) / len(ar_errors) if ar_errors and params.enable_bucket else 0.0
    return BucketPlan(buckets, assignments, mean_err, params.enable_bucket, unusable)
