"""The training image pipeline: readable images, their buckets, per-epoch batches and batch loading
with sd-scripts' augmentations, captions and CLIP token layout.

Nothing here crashes on a bad file: images that cannot be decoded, have an unusable size or an
undecodable caption are reported in `TrainDataset.problems` (path + reason) and skipped; only a
dataset with nothing left fails, with `JobFailure(dataset_invalid)`.

Randomness is explicit: `epoch_batches` derives its order from (seed, epoch) alone, and
`load_batch` draws flips, crops, colour jitter and caption shuffles from the `random.Random`
it is given, so a run is reproducible and every rank computes the same global order.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.core.dataset.buckets import BucketParams, Size, crop_ltrb
from trainer.core.dataset.captions import process_caption, tag_frequency
from trainer.core.dataset.layout import DatasetLayout, DatasetParams, Subset, image_id
from trainer.core.dataset.plan import PlannedImage, plan_epoch
from trainer.core.failures import JobFailure, Reason
from trainer.core.images import NotAnImage, UnreadableImage, header_size

CLIP_WINDOW = 77  # tokens the CLIP text encoders see at once: BOS + 75 + EOS
# A caption file's size limit: CLIP reads at most 225 tokens (~1 KB of text); wildcard captions hold a few
# lines of alternatives. Larger files are reported and their image skipped.
MAX_CAPTION_BYTES = 64 * 1024


@dataclass(frozen=True)
class DatasetProblem:
    path: str  # the file at fault (image or caption), as the user named it
    reason: str  # what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class _Probed:
    size: Size | None
    caption: str | None  # None when there is no caption text
    problem: DatasetProblem | None


@dataclass(frozen=True)
class ItemRef:
    """One sample of a batch: an index into `TrainDataset.items`."""

    item: int


@dataclass
class DatasetItem:
    key: str  # stable id (latent caches): "<root>:<relative path>", "@<dataset>" appended past dataset 0
    rel_path: str  # relative to its root
    path: str  # local file
    caption: str  # the caption file's text (or the subset's class tokens)
    subset: int  # index into TrainDataset.subsets
    size: Size  # original (w, h)
    bucket: Size  # (w, h) it trains at
    resized: Size  # (w, h) before cropping to the bucket
    repeats: int  # samples per epoch (balanced for reg images)
    is_reg: bool
    loss_weight: float  # prior_loss_weight for reg images, else 1.0


@dataclass(frozen=True)
class Bucket:
    dataset: int
    reso: Size  # (w, h)
    slots: tuple[int, ...]  # item indices, each repeated `repeats` times


@dataclass
class Batch:
    pixel_values: torch.Tensor | None  # (B, 3, H, W) float32 in [-1, 1]; None when asked without pixels
    captions: list[str]  # after shuffle / dropout
    input_ids: list[torch.Tensor]  # one LongTensor (B, n_chunks·77) per tokenizer
    loss_weights: torch.Tensor  # (B,) float32
    original_sizes_hw: torch.Tensor  # (B, 2) long: SDXL size conditioning
    crop_top_lefts: torch.Tensor  # (B, 2) long
    target_sizes_hw: torch.Tensor  # (B, 2) long
    image_keys: list[str]
    flipped: list[bool]
    bucket: Size  # (w, h) shared by the whole batch


class TrainDataset:
    """The readable images of a `DatasetLayout`, bucketed, with batch loading.

    `root` / `reg_root` are the local folders the layout's relative paths point into.
    `max_token_length` is None or 75 (one CLIP window), 150 or 225 (sd-scripts' 2 or 3 windows).
    `check_pixels=False` reads only image headers (faster; a corrupt body then fails in
    `load_batch` with JobFailure(dataset_invalid) naming the file)."""

    def __init__(
        self,
        layout: DatasetLayout,
        spec: Any,
        root: str,
        *,
        tokenizers: Sequence[Any] | None = None,
        max_token_length: int | None = None,
        reg_root: str | None = None,
        check_pixels: bool = True,
        workers: int = 4,
    ) -> None:
        if max_token_length not in (None, 75, 150, 225):
            raise ValueError(f"max_token_length must be None, 75, 150 or 225, got {max_token_length}")
        if any(sub.root == "reg" for sub in layout.subsets) and reg_root is None:
            raise ValueError("the layout has regularisation subsets: pass reg_root")
        self.layout = layout
        self.tokenizers = list(tokenizers or [])
        self.max_token_length = max_token_length
        self.prior_loss_weight = float(spec.dataset.prior_loss_weight)
        self.datasets: list[DatasetParams] = layout.datasets or [DatasetParams(BucketParams.from_spec(spec))]
        self.problems: list[DatasetProblem] = []
        self.warnings: list[str] = []
        self._roots = {"train": root, "reg": reg_root}
        probed = self._probe(check_pixels, workers)
        sizes, captions = self._readable(probed)
        self.plan = plan_epoch(layout.subsets, self.datasets, sizes)
        self._report_problems(probed)
        self.subsets: list[Subset] = self.plan.subsets
        self.items: list[DatasetItem] = [self._item(im, captions[im.subset][im.index]) for im in self.plan.images]
        if not any(not it.is_reg for it in self.items):
            shown = "; ".join(str(p) for p in self.problems[:3])
            raise JobFailure(Reason.DATASET_INVALID,
                             f"no readable training image in {spec.dataset.uri}"
                             + (f" ({len(self.problems)} problem(s), e.g. {shown})" if self.problems else ""))
        self.buckets: list[Bucket] = [Bucket(b.dataset, b.reso, b.slots) for b in self.plan.buckets]

    def _probe(self, check_pixels: bool, workers: int) -> list[list[_Probed]]:
        """Every image's header (and pixels unless told not to) and caption, read in parallel;
        aligned with the layout's subsets and their images."""
        subsets = self.layout.subsets
        jobs = [(si, im) for si, sub in enumerate(subsets) for im in sub.images]

        def probe(job: tuple[int, Any]) -> _Probed:
            si, im = job
            base = self._roots[subsets[si].root]
            size, problem = _probe_image(_local(base, im.path), im.path, check_pixels)
            if problem:
                return _Probed(None, None, problem)
            caption, problem = _read_caption(base, im.caption_path, subsets[si])
            return _Probed(size, caption, problem)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            flat = iter(list(pool.map(probe, jobs)))
        return [[next(flat) for _ in sub.images] for sub in subsets]

    def _readable(self, probed: list[list[_Probed]]) -> tuple[list[list[Size | None]], list[list[str]]]:
        """Sizes (None for an image with a problem) and captions: the class tokens (else an empty
        caption, as sd-scripts does) where there is no caption text, with a warning for empty files."""
        sizes: list[list[Size | None]] = []
        captions: list[list[str]] = []
        empty_captions: list[str] = []
        for sub, results in zip(self.layout.subsets, probed):
            sizes.append([None if r.problem else r.size for r in results])
            captions.append([])
            for im, r in zip(sub.images, results):
                if r.problem is None and r.caption is None and im.caption_path is not None:
                    empty_captions.append(im.caption_path)
                captions[-1].append(r.caption if r.caption is not None else sub.class_tokens or "")
        if empty_captions:
            self.warnings.append(f"{len(empty_captions)} caption file(s) are empty (e.g. '{empty_captions[0]}'); "
                                 "their images train with the subset's class tokens instead")
        return sizes, captions

    def _report_problems(self, probed: list[list[_Probed]]) -> None:
        """Unreadable files and images too small for a bucket, in the layout's order."""
        found = {(si, j): r.problem for si, results in enumerate(probed) for j, r in enumerate(results) if r.problem}
        for u in self.plan.unusable:
            sub = self.layout.subsets[u.subset]
            steps = self.datasets[sub.dataset].buckets.steps
            found[(u.subset, u.index)] = DatasetProblem(
                sub.images[u.index].path, f"{u.size[0]}x{u.size[1]} is smaller than bucket_reso_steps ({steps}) "
                "with bucket_no_upscale; use a larger image")
        self.problems += [found[k] for k in sorted(found)]

    def _item(self, im: PlannedImage, caption: str) -> DatasetItem:
        sub = self.layout.subsets[im.subset]
        path = sub.images[im.index].path
        return DatasetItem(
            key=image_id(sub.root, path) + (f"@{sub.dataset}" if sub.dataset else ""), rel_path=path,
            path=_local(self._roots[sub.root], path), caption=caption, subset=im.subset, size=im.size,
            bucket=im.bucket, resized=im.resized, repeats=im.repeats, is_reg=sub.is_reg,
            loss_weight=self.prior_loss_weight if sub.is_reg else 1.0)

    # -- epoch structure -----------------------------------------------------------------------
    def _batch_size(self, dataset: int, batch_size: int) -> int:
        return self.plan.batch_size(dataset, batch_size)

    def num_batches(self, batch_size: int) -> int:
        """Batches per epoch over all processes (sd-scripts' len(train_dataloader))."""
        return self.plan.batches_per_epoch(batch_size)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1, grad_accum: int = 1) -> int:
        """Optimizer updates per epoch: ceil(batches / world_size / grad_accum), as sd-scripts counts."""
        return self.plan.steps_per_epoch(batch_size, world_size, grad_accum)

    @property
    def image_steps_per_epoch(self) -> int:
        return sum(it.repeats for it in self.items if not it.is_reg)

    def epoch_batches(self, epoch: int, *, seed: int, batch_size: int, rank: int = 0,
                      world_size: int = 1) -> list[list[ItemRef]]:
        """This rank's batches for `epoch` (1-based, as sd-scripts counts epochs).

        Each bucket's samples (repeats included) are shuffled and cut into batches, the batches
        of all buckets are shuffled together, then dealt round-robin to the ranks; the list is
        padded by wrapping around so that every rank gets ceil(batches / world_size) batches
        (accelerate's even_batches), which keeps DDP ranks in step."""
        if epoch < 1:
            raise ValueError(f"epoch is 1-based (sd-scripts' numbering), got {epoch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world_size {world_size}")
        rng = random.Random(f"lathe-epoch:{seed}:{epoch}")  # str seeds hash with SHA-512: stable across processes
        batches: list[list[int]] = []
        for bucket in self.buckets:
            slots = list(bucket.slots)
            rng.shuffle(slots)
            bs = self._batch_size(bucket.dataset, batch_size)
            batches += [slots[i:i + bs] for i in range(0, len(slots), bs)]
        rng.shuffle(batches)
        per_rank = -(-len(batches) // world_size)
        mine = [batches[(k * world_size + rank) % len(batches)] for k in range(per_rank)]
        return [[ItemRef(i) for i in batch] for batch in mine]

    # -- loading -------------------------------------------------------------------------------
    def load_batch(self, refs: Sequence[ItemRef], *, epoch: int, rng: random.Random,
                   with_pixels: bool = True) -> Batch:
        """Images, captions and tokens of one batch. `with_pixels=False` skips decoding (latents
        cached) but still draws the flips and reports the size conditioning of a centre crop."""
        if not refs:
            raise ValueError("load_batch needs at least one item")
        items = [self.items[r.item] for r in refs]
        bucket = items[0].bucket
        if any(it.bucket != bucket for it in items):
            raise ValueError("all items of a batch must share one bucket; use epoch_batches")
        pixels: list[torch.Tensor] = []
        captions: list[str] = []
        original_hw: list[tuple[int, int]] = []
        crop_tl: list[tuple[int, int]] = []
        flipped_flags: list[bool] = []
        for it in items:
            sub = self.subsets[it.subset]
            flipped = sub.flip_aug and rng.random() < 0.5
            if with_pixels:
                arr = self._decode(it)
                arr = _resize_and_crop(arr, it.resized, bucket, rng if sub.random_crop else None)
                if sub.color_aug:
                    arr = _color_aug(arr, rng)
                if flipped:
                    arr = arr[:, ::-1]
                pixels.append(_to_tensor(arr))
            ltrb = crop_ltrb(bucket, it.size)
            left = bucket[0] - ltrb[2] if flipped else ltrb[0]
            original_hw.append((it.size[1], it.size[0]))
            crop_tl.append((int(ltrb[1]), int(left)))
            flipped_flags.append(flipped)
            captions.append(process_caption(it.caption, sub.caption, epoch=epoch, rng=rng))
        n = len(items)
        return Batch(
            pixel_values=torch.stack(pixels) if with_pixels else None,
            captions=captions,
            input_ids=[tokenize(tok, captions, self.max_token_length) for tok in self.tokenizers],
            loss_weights=torch.tensor([it.loss_weight for it in items], dtype=torch.float32),
            original_sizes_hw=torch.tensor(original_hw, dtype=torch.long),
            crop_top_lefts=torch.tensor(crop_tl, dtype=torch.long),
            target_sizes_hw=torch.tensor([(bucket[1], bucket[0])] * n, dtype=torch.long),
            image_keys=[it.key for it in items],
            flipped=flipped_flags,
            bucket=bucket,
        )

    def load_for_cache(self, ref: ItemRef | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pixels, horizontally flipped pixels or None) of one item for latent caching: centre
        crop, no colour jitter (caching is refused with random_crop / color_aug). The flipped
        copy is made only when the item's subset has flip_aug. Tensors are (3, H, W) in [-1, 1]."""
        it = self.items[ref.item if isinstance(ref, ItemRef) else ref]
        arr = _resize_and_crop(self._decode(it), it.resized, it.bucket, None)
        flipped = _to_tensor(arr[:, ::-1]) if self.subsets[it.subset].flip_aug else None
        return _to_tensor(arr), flipped

    def _decode(self, it: DatasetItem) -> np.ndarray:
        try:
            with Image.open(it.path) as img:
                return np.asarray(img.convert("RGB"))
        except Exception as exc:  # the file changed or was only header-checked
            raise JobFailure(Reason.DATASET_INVALID, f"{it.rel_path}: cannot decode the image ({exc}); "
                             "re-export it as PNG or JPEG") from None

    # -- reporting -----------------------------------------------------------------------------
    def sd_scripts_metadata(self, batch_size: int) -> dict[str, Any]:
        """Dataset values sd-scripts records in an adapter's `ss_*` header (native Python values;
        the writer serialises them as sd-scripts does)."""
        tags: dict[str, dict[str, int]] = {}
        for si, sub in enumerate(self.subsets):
            caps = [it.caption for it in self.items if it.subset == si]
            tags.setdefault(sub.name, {}).update(tag_frequency(caps))
        bucket_info = None
        if len(self.datasets) == 1 and self.datasets[0].buckets.enable_bucket:
            ar = [abs(it.bucket[0] / it.bucket[1] - it.size[0] / it.size[1]) for it in self.items]
            bucket_info = {
                "buckets": {i: {"resolution": list(b.reso), "count": len(b.slots)} for i, b in enumerate(self.buckets)},
                "mean_img_ar_error": sum(ar) / len(ar),
            }
        return {
            "ss_num_train_images": sum(len(s.images) * s.num_repeats for s in self.subsets if not s.is_reg),
            "ss_num_reg_images": sum(len(s.images) * s.num_repeats for s in self.subsets if s.is_reg),
            "ss_num_batches_per_epoch": self.num_batches(batch_size),
            "ss_dataset_dirs": {s.name: {"n_repeats": s.num_repeats, "img_count": len(s.images)}
                                for s in self.subsets if s.images},
            "ss_tag_frequency": tags,
            "ss_bucket_info": bucket_info,
        }


# ---------------------------------------------------------------------------------------------
# Files


def _local(base: str | None, rel: str) -> str:
    assert base is not None
    return os.path.join(base, *rel.split("/"))


def _probe_image(path: str, shown: str, check_pixels: bool) -> tuple[Size | None, DatasetProblem | None]:
    try:
        size = header_size(path)
    except FileNotFoundError:
        return None, DatasetProblem(shown, "listed but missing from the downloaded dataset")
    except NotAnImage as exc:
        return None, DatasetProblem(shown, f"not a readable image ({exc}); re-export it as PNG or JPEG or remove it")
    except UnreadableImage as exc:  # a known format whose header is cut short or damaged
        return None, DatasetProblem(shown, f"cannot be decoded ({exc}); re-export it as PNG or JPEG or remove it")
    if check_pixels:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # PIL raises many types for a damaged body; each is a per-file problem here
            return None, DatasetProblem(shown, f"cannot be decoded ({exc}); re-export it as PNG or JPEG or remove it")
    return size, None


def _read_caption(base: str, caption_path: str | None, sub: Subset) -> tuple[str | None, DatasetProblem | None]:
    """sd-scripts' read_caption: the first line, stripped (all non-empty lines with wildcards).
    None when there is no caption file or it holds no text."""
    if caption_path is None:
        return None, None
    try:
        with open(_local(base, caption_path), "rb") as fh:
            raw = fh.read(MAX_CAPTION_BYTES + 1)
        if len(raw) > MAX_CAPTION_BYTES:
            # Read no further: the whole text would be kept per image and tallied into the adapter's
            # ss_tag_frequency header, however large the file.
            return None, DatasetProblem(caption_path, f"is larger than {MAX_CAPTION_BYTES} bytes, more than any "
                                        "caption can use; shorten it (the image is skipped)")
        lines = raw.decode("utf-8-sig").splitlines()
    except FileNotFoundError:
        return None, None
    except UnicodeDecodeError:
        return None, DatasetProblem(caption_path, "is not UTF-8 text; re-save it as UTF-8 (the image is skipped)")
    except OSError as exc:
        return None, DatasetProblem(caption_path, f"cannot be read ({exc}); the image is skipped")
    if sub.caption.enable_wildcard:
        text = "\n".join(line.strip() for line in lines if line.strip())
    else:
        text = lines[0].strip() if lines else ""
    return text or None, None


# ---------------------------------------------------------------------------------------------
# Pixels


def _resize_and_crop(arr: np.ndarray, resized: Size, bucket: Size, rng: random.Random | None) -> np.ndarray:
    """sd-scripts' trim_and_resize_if_required: resize to `resized` (area filter when shrinking,
    Lanczos when enlarging), then crop to the bucket, centred or at a random offset."""
    h, w = arr.shape[:2]
    if (w, h) != tuple(resized):
        shrinking = w >= resized[0] and h >= resized[1]
        img = Image.fromarray(arr).resize(resized, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
        arr = np.asarray(img)
        h, w = arr.shape[:2]
    if w > bucket[0]:
        trim = w - bucket[0]
        p = rng.randint(0, trim) if rng is not None else trim // 2
        arr = arr[:, p:p + bucket[0]]
    if h > bucket[1]:
        trim = h - bucket[1]
        p = rng.randint(0, trim) if rng is not None else trim // 2
        arr = arr[p:p + bucket[1]]
    if arr.shape[0] != bucket[1] or arr.shape[1] != bucket[0]:
        raise AssertionError(f"internal error: cropped to {arr.shape[1]}x{arr.shape[0]}, bucket {bucket}")
    return arr


def _color_aug(arr: np.ndarray, rng: random.Random) -> np.ndarray:
    """sd-scripts' color_aug: one time in three, either a hue shift of up to ±8 OpenCV hue units
    (±16°) or its 'gamma' jitter, x ** U(0.95, 1.05) on raw 0–255 values (a brightness jitter
    in effect; kept as sd-scripts has it)."""
    if rng.random() > 0.33:
        return arr
    if rng.random() > 0.5:
        shift = rng.uniform(-8.0, 8.0)
        hsv = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).convert("HSV")).copy()
        delta = round(shift * 2.0 / 360.0 * 256.0)  # OpenCV hue units (180 per turn) → PIL's (256 per turn)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int16) + delta) % 256
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(arr.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 → CHW float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, order="C")).permute(2, 0, 1).float()  # a writable copy
    return (t / 255.0 - 0.5) / 0.5


# ---------------------------------------------------------------------------------------------
# Tokens


def tokenize(tokenizer: Any, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """sd-scripts' token layout: (B, n·77) with n = 1, 2 or 3 CLIP windows.

    The caption is tokenized to n·75 + 2 tokens, then cut into windows of BOS + 75 tokens + the
    sequence's last token. When the tokenizer pads with a token other than EOS (SD2, SDXL's second
    encoder), a window whose text ends inside it gets EOS as its last token, and a window that
    starts with padding gets EOS first, so each window reads BOS … EOS [pad …]."""
    total = CLIP_WINDOW if max_token_length in (None, 75) else max_token_length + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=total,
                    return_tensors="pt").input_ids.long()
    if total == CLIP_WINDOW:
        return ids
    bos, last = ids[:, :1], ids[:, -1:]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    inner = CLIP_WINDOW - 2
    windows = []
    for start in range(1, total - CLIP_WINDOW + 2, inner):
        window = torch.cat([bos, ids[:, start:start + inner], last], dim=1)
        if pad != eos:
            ends_in_text = (window[:, -2] != eos) & (window[:, -2] != pad)
            window[ends_in_text, -1] = eos
            window[window[:, 1] == pad, 1] = eos
        windows.append(window)
    return torch.cat(windows, dim=1)
