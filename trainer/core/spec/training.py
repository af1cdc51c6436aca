"""The `training`, `noise` and `precision` sections, and what caching forbids."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from msgspec import Meta

from trainer.core.spec.common import NonNegInt, PositiveInt, _Base
from trainer.core.spec.dataset import any_shuffle
from trainer.core.spec.derived import train_text_encoder
from trainer.core.spec.problems import Found, Problem

if TYPE_CHECKING:
    from trainer.core.spec.jobspec import JobSpec

Attention = Literal["sdpa", "xformers", "mem_eff_attn", "default"]
# sd-scripts' --dynamo_backend values that stock PyTorch provides (the others need extra packages).
DynamoBackend = Literal["inductor", "eager", "aot_eager", "cudagraphs"]


class TrainingSpec(_Base):
    """Length, batch, accumulation, timesteps and loss weighting."""

    max_train_steps: PositiveInt | None = None  # None and no epochs ⇒ 1600
    max_train_epochs: PositiveInt | None = None  # wins over max_train_steps
    batch_size: PositiveInt = 1  # --train_batch_size
    gradient_accumulation_steps: PositiveInt = 1  # a step is one optimizer update
    gradient_checkpointing: bool = False
    seed: NonNegInt | None = None  # None: a random seed, recorded in the metadata
    min_snr_gamma: Annotated[float, Meta(gt=0.0)] | None = None
    min_timestep: Annotated[int, Meta(ge=0, le=999)] = 0
    max_timestep: Annotated[int, Meta(ge=1, le=1000)] = 1000


class NoiseSpec(_Base):
    noise_offset: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: Annotated[int, Meta(ge=1, le=16)] | None = None
    multires_noise_discount: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.3


class PrecisionSpec(_Base):
    """Precision and memory/speed switches."""

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    attention: Attention = "sdpa"  # --sdpa / --xformers / --mem_eff_attn
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    vae_batch_size: PositiveInt = 1
    # --torch_compile / --dynamo_backend: the step's forward and loss (UNet with the adapter hooks) run
    # under torch.compile, once per bucket shape. "auto": on where the job trains on CUDA with an adapter
    # that compiles into one graph (`compiles_cleanly`), off on CPU, where compiling costs more than it saves.
    torch_compile: bool | Literal["auto"] = "auto"
    dynamo_backend: DynamoBackend = "inductor"


def check_caching(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, ds, prec = out.err, spec.dataset, spec.precision
    subsets = ds.subsets or []
    any_caption_dropout = (
        ds.caption_dropout_rate > 0 or ds.caption_tag_dropout_rate > 0 or ds.caption_dropout_every_n_epochs > 0
        or any((s.caption_dropout_rate or 0) > 0 or (s.caption_tag_dropout_rate or 0) > 0 for s in subsets)
    )
    # Text-encoder output caching freezes the captions.
    if prec.cache_text_encoder_outputs or prec.cache_text_encoder_outputs_to_disk:
        if any_shuffle(ds):
            err("precision.cache_text_encoder_outputs",
                "cannot be combined with dataset.shuffle_caption (cached outputs fix the caption order); "
                "turn one of them off")
        if any_caption_dropout:
            err("precision.cache_text_encoder_outputs",
                "cannot be combined with caption dropout (cached outputs fix the captions); set the dropout rates to 0")
        if train_text_encoder(spec):
            err("precision.cache_text_encoder_outputs",
                "needs a frozen text encoder: set network.train_unet_only = true")

    # Latent caching freezes the pixels.
    if prec.cache_latents or prec.cache_latents_to_disk:
        if ds.color_aug or any(s.color_aug for s in subsets):
            err("precision.cache_latents", "cannot be combined with dataset.color_aug (cached latents fix the "
                "pixels); turn one of them off")
        if ds.random_crop or any(s.random_crop for s in subsets):
            err("precision.cache_latents", "cannot be combined with dataset.random_crop; turn one of them off")
    return out


def check_noise(spec: JobSpec) -> list[Problem]:
    out = Found()
    if spec.noise.adaptive_noise_scale is not None and spec.noise.noise_offset is None:
        out.err("noise.adaptive_noise_scale", "needs noise.noise_offset (it is added to the offset, as in sd-scripts)")
    return out


def check_precision(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, prec = out.err, spec.precision
    if prec.full_fp16 and prec.mixed_precision != "fp16":
        err("precision.full_fp16", "needs precision.mixed_precision = 'fp16'")
    if prec.full_bf16 and prec.mixed_precision != "bf16":
        err("precision.full_bf16", "needs precision.mixed_precision = 'bf16'")
    if prec.full_fp16 and prec.full_bf16:
        err("precision.full_bf16", "choose one of full_fp16 / full_bf16")
    return out


def check_training(spec: JobSpec) -> list[Problem]:
    out = Found()
    err, warn, tr = out.err, out.warn, spec.training
    if tr.min_timestep >= tr.max_timestep:
        err("training.min_timestep", "must be below training.max_timestep")
    if tr.max_train_steps is not None and tr.max_train_epochs is not None:
        warn("training.max_train_steps", "ignored: training.max_train_epochs wins (as in sd-scripts)")
    return out
