"""One epoch's plan from image sizes: which images train, how often, in which bucket, and how many
batches and optimizer steps an epoch has.

The trainer's dataset (sizes from the downloaded files) and the service's preflight (sizes from image
headers in the object store) both call `plan_epoch`, so the steps the preflight predicts are the
steps the trainer runs. Torch-free.

The order of the rules is the trainer's: images without a size (unreadable) or whose bucket has a 0
side (smaller than one bucket step with bucket_no_upscale) are left out first, then regularisation
repeats are balanced against what remains, then every sample (image × repeats) goes into its
(dataset, bucket) and each bucket is cut into batches of its dataset's batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from trainer.core.dataset.buckets import Bucketer, Size
from trainer.core.dataset.layout import DatasetParams, Subset, balanced_repeats


@dataclass(frozen=True)
class PlannedImage:
    subset: int  # index into the layout's subsets
    index: int  # index into that subset's images as the layout lists them
    size: Size  # original (w, h)
    bucket: Size  # (w, h) it trains at
    resized: Size  # (w, h) before cropping to the bucket
    repeats: int  # samples per epoch (balanced for reg images; always ≥ 1 here)


@dataclass(frozen=True)
class PlannedBucket:
    dataset: int  # index into the plan's datasets
    reso: Size  # (w, h)
    slots: tuple[int, ...]  # indices into EpochPlan.images, each repeated `repeats` times

    @property
    def images(self) -> int:
        return len(set(self.slots))

    @property
    def image_steps(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class Unusable:
    subset: int
    index: int
    size: Size


@dataclass
class EpochPlan:
    subsets: list[Subset]  # the layout's subsets less the images left out (what was balanced)
    images: list[PlannedImage]  # images with at least one sample per epoch, in layout order
    buckets: list[PlannedBucket]  # sorted by (dataset, reso)
    datasets: list[DatasetParams]
    unusable: list[Unusable]  # bucket with a 0 side: left out

    def batch_size(self, dataset: int, batch_size: int) -> int:
        """A `[[datasets]]` table's batch_size wins over training.batch_size."""
        return self.datasets[dataset].batch_size or batch_size

    def bucket_batches(self, bucket: PlannedBucket, batch_size: int) -> int:
        return -(-bucket.image_steps // self.batch_size(bucket.dataset, batch_size))

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches per epoch over all processes (sd-scripts' len(train_dataloader))."""
        return sum(self.bucket_batches(b, batch_size) for b in self.buckets)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1, grad_accum: int = 1) -> int:
        """Optimizer updates per epoch: ceil(batches / world_size / grad_accum), as sd-scripts counts."""
        return -(-self.batches_per_epoch(batch_size) // (world_size * grad_accum))


def plan_epoch(subsets: Sequence[Subset], datasets: Sequence[DatasetParams],
               sizes: Sequence[Sequence[Size | None]]) -> EpochPlan:
    """The plan for a layout's `subsets` under `datasets` (one entry per dataset index the subsets
    use), given each image's (w, h) — `sizes[i][j]` for `subsets[i].images[j]`, None to leave the
    image out (unreadable)."""
    if len(sizes) != len(subsets) or any(len(s) != len(sub.images) for s, sub in zip(sizes, subsets)):
        raise ValueError("sizes must list one entry per image of every subset")
    bucketers = [Bucketer(d.buckets) for d in datasets]
    unusable: list[Unusable] = []
    usable: list[list[tuple[int, Size, Size, Size]]] = []  # per subset: (index, size, bucket, resized)
    for si, sub in enumerate(subsets):
        kept = []
        for j, size in enumerate(sizes[si]):
            if size is None:
                continue
            bucket, resized = bucketers[sub.dataset].select(*size)
            if bucket[0] <= 0 or bucket[1] <= 0:
                unusable.append(Unusable(si, j, size))
                continue
            kept.append((j, size, bucket, resized))
        usable.append(kept)
    kept_subsets = [replace(sub, images=[sub.images[k[0]] for k in usable[si]]) for si, sub in enumerate(subsets)]
    images: list[PlannedImage] = []
    for si, reps in enumerate(balanced_repeats(kept_subsets)):
        images += [PlannedImage(si, j, size, bucket, resized, r)
                   for (j, size, bucket, resized), r in zip(usable[si], reps)
                   if r > 0]  # reg images beyond what balances the training images (sd-scripts drops them too)
    return EpochPlan(kept_subsets, images, _bucket_slots(subsets, images), list(datasets), unusable)


def _bucket_slots(subsets: Sequence[Subset], images: list[PlannedImage]) -> list[PlannedBucket]:
    by_bucket: dict[tuple[int, Size], list[int]] = {}
    for idx, im in enumerate(images):
        by_bucket.setdefault((subsets[im.subset].dataset, im.bucket), []).extend([idx] * im.repeats)
    return [PlannedBucket(d, reso, tuple(slots)) for (d, reso), slots in sorted(by_bucket.items())]
