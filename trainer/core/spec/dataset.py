"""The `dataset` section: images, subsets, bucketing and caption options, and their geometry checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.dataset.layout import spec_problems as dataset_spec_problems
from trainer.core.spec.common import (
    Fraction,
    NonNegInt,
    PositiveInt,
    Reso,
    ShortText,
    Text,
    Uri,
    _Base,
)
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

MaxTokenLength = Literal[75, 150, 225]
# Multiple of bucket_reso_steps that sd-scripts asserts per architecture (train_network / sdxl_train_network).
BUCKET_STEP_MULTIPLE: dict[str, int] = {"sd1": 64, "sd2": 64, "sdxl": 32}


class SubsetSpec(_Base):
    """One `[[datasets.subsets]]` entry; unset options inherit the dataset's."""

    image_dir: Annotated[str, Meta(max_length=1024)]  # relative to the dataset root, e.g. "10_character"
    num_repeats: PositiveInt = 1
    class_tokens: Text | None = None  # caption when an image has no caption file
    is_reg: bool = False  # regularisation images (weighted by prior_loss_weight)
    caption_extension: ShortText | None = None
    keep_tokens: NonNegInt | None = None
    shuffle_caption: bool | None = None
    caption_separator: ShortText | None = None
    flip_aug: bool | None = None
    color_aug: bool | None = None
    random_crop: bool | None = None
    caption_dropout_rate: Fraction | None = None
    caption_dropout_every_n_epochs: NonNegInt | None = None
    caption_tag_dropout_rate: Fraction | None = None


class DatasetSpec(_Base):
    """Training images (`--train_data_dir`, `--reg_data_dir`, `--dataset_config`, bucketing, captions)."""

    uri: Uri  # folder of `<repeats>_<concept>` subfolders, or a .zip/.tar archive of one
    reg_uri: Uri | None = None  # --reg_data_dir, same layout, is_reg subsets
    # sd-scripts dataset TOML text ([general]/[[datasets]]/[[datasets.subsets]])
    config_toml: Annotated[str, Meta(max_length=256 * 1024)] | None = None
    subsets: Annotated[list[SubsetSpec], Meta(max_length=1000)] | None = None  # explicit subsets instead of folder discovery
    resolution: Reso | Annotated[list[Reso], Meta(min_length=2, max_length=2)] = 512  # int or [w, h]
    caption_extension: ShortText = ".caption"  # sd-scripts' default; the guides use ".txt"
    enable_bucket: bool = False
    min_bucket_reso: Reso = 256
    max_bucket_reso: Reso = 1024
    bucket_reso_steps: Annotated[int, Meta(ge=8, le=256)] = 64  # 32 is common for SDXL
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: NonNegInt = 0
    caption_separator: ShortText = ","
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    caption_dropout_rate: Fraction = 0.0
    caption_dropout_every_n_epochs: NonNegInt = 0
    caption_tag_dropout_rate: Fraction = 0.0
    max_token_length: MaxTokenLength | None = None  # None = 75 (one CLIP window)
    dataset_repeats: NonNegInt = 1  # --dataset_repeats (fine-tune metadata datasets; kept for parity)
    prior_loss_weight: Annotated[float, Meta(ge=0.0)] = 1.0
    max_data_loader_n_workers: NonNegInt = 8
    persistent_data_loader_workers: bool = False
    # A rerun (`lathe rerun`): the dataset-manifest.json of the job it repeats; the trainer fails with
    # dataset_changed when a file's bytes (sha256) differ from it.
    expect_manifest: Uri | None = None

    @property
    def resolution_wh(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])


def any_shuffle(ds: DatasetSpec) -> bool:
    """Whether any caption is shuffled (the dataset's option or a subset's)."""
    return ds.shuffle_caption or any(s.shuffle_caption for s in ds.subsets or [])


def check_dataset(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, ds, arch = out.err, out.warn, spec.dataset, spec.model.arch
    w, h = ds.resolution_wh
    if w % 8 or h % 8:
        err("dataset.resolution", f"{w}x{h}: width and height must be multiples of 8")
    if ds.enable_bucket:
        if ds.min_bucket_reso > ds.max_bucket_reso:
            err("dataset.min_bucket_reso", "must not exceed dataset.max_bucket_reso")
        if ds.min_bucket_reso % ds.bucket_reso_steps or ds.max_bucket_reso % ds.bucket_reso_steps:
            warn("dataset.bucket_reso_steps", "min/max_bucket_reso are not multiples of bucket_reso_steps; "
                 "sd-scripts rounds them down")
        if min(w, h) < ds.min_bucket_reso:
            err("dataset.min_bucket_reso", f"is above the resolution {w}x{h}; lower it")
        if max(w, h) > ds.max_bucket_reso:
            err("dataset.max_bucket_reso", f"is below the resolution {w}x{h}; raise it")
    for path, message in dataset_spec_problems(ds):  # the dataset layout's own rules, before any listing
        err(path, message)
    if ds.config_toml is not None and ds.subsets is not None:
        err("dataset.subsets", "give either dataset.config_toml or dataset.subsets, not both")
    if ds.keep_tokens and not any_shuffle(ds):
        warn("dataset.keep_tokens", "only matters with shuffle_caption or caption tag dropout")
    step_multiple = BUCKET_STEP_MULTIPLE[arch]
    if ds.enable_bucket and ds.bucket_reso_steps % step_multiple:
        warn("dataset.bucket_reso_steps", f"sd-scripts refuses values that are not multiples of {step_multiple} for "
             f"{arch}; Lathe accepts them, but files trained so are not reproducible with sd-scripts")
    return out
