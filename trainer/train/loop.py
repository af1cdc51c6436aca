"""The training loop's parts on accelerate: one process per device, a step is one optimizer update.

`trainer.train.recipe` runs the phases (setup, resume, epochs of bucketed batches, saves,
checkpoints). This module holds what those phases and `bench/train.py` share: the module DDP wraps,
the accelerator, model preparation, the micro-batch loss, the adapter writer. sd-scripts'
train_network.py is the reference for every choice a user can see (loss, weighting, names, metadata).

Two rules keep multi-process runs right:
- UNet, text encoders and network live in ONE module (`DiffusionModel`) whose forward computes the
  noise prediction; that module is what accelerate wraps in DDP, so gradients of every adapter
  parameter are all-reduced. Calling the UNet directly would silently skip the sync.
- Every random draw of a micro-batch comes from RNGs reseeded from (seed, rank, step, micro-batch)
  and every batch's augmentations from a `random.Random` derived the same way, so a run is
  reproducible on CPU, resumable at any step boundary without replaying anything, and unaffected by
  whatever else (sample images, logging) consumes randomness between steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import JobSpec, train_text_encoder
from trainer.train import noise as N
from trainer.train.latents import LatentCache

log = logging.getLogger("lathe.train")



@dataclass
class LoopHooks:
    """Callbacks for the job runner; all optional.

    on_step runs on every rank after each step (the runner reports from rank 0 and renders its
    share of sample images on each); should_stop / checkpoint_due are asked on every rank but rank
    0's answer is what all ranks act on; on_save / on_checkpoint run on rank 0 only. on_step runs when
    the buffered losses are flushed (every step on CPU eager; in batches on CUDA), in step order."""

    on_step: Callable[[int, int, int, float, float, dict[str, float], float], None] | None = None
    should_stop: Callable[[], str | None] | None = None
    on_save: Callable[[str, str], None] | None = None
    checkpoint_due: Callable[[int], bool] | None = None
    on_checkpoint: Callable[[str, int], None] | None = None
    warn: Callable[[str], None] | None = None  # a line for the job's status warnings
    on_plan: Callable[[int, int], None] | None = None  # (total steps, epochs) once they are known, rank 0


@dataclass
class TrainResult:
    final_path: str | None  # None when stopped before the end
    steps_done: int
    epochs_done: int
    loss_history: list[float]  # one value per step (mean of its micro-batches, this rank)
    avg_loss: float
    stopped: str | None  # "cancelled" / "preempted" / None
    saved_files: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    ss_metadata: dict[str, str] = field(default_factory=dict)
    cache_stats: dict[str, int] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch: call before `build_network` so the adapter's initial weights
    (and hence the loss curve) are the same for the same seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any values, stable across processes and Python versions."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------
# The module DDP wraps


class DiffusionModel(nn.Module):
    """UNet + text encoders + adapter network; forward() = text conditioning + noise prediction."""

    def __init__(self, parts: Any, network: nn.Module, *, train_te: bool, clip_skip: int | None,
                 max_token_length: int | None) -> None:
        super().__init__()
        self.unet = parts.unet
        self.text_encoders = nn.ModuleList(parts.text_encoders)
        self.network = network
        self.parts = parts
        self.train_te = train_te
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length

    def encode_text(self, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        from trainer.models.load import encode_prompts

        with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()):
            return encode_prompts(self.parts, input_ids, clip_skip=self.clip_skip,
                                  max_token_length=self.max_token_length)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: list[torch.Tensor] | None = None,
                hidden: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            assert input_ids is not None
            hidden, pooled = self.encode_text(input_ids)
        dtype = self.unet.dtype
        added = None
        if self.parts.arch == "sdxl":
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return self.unet(noisy_latents.to(dtype), timesteps, hidden.to(dtype), added_cond_kwargs=added).sample


# ---------------------------------------------------------------------------------------------
# Setup helpers


def effective_mixed_precision(requested: str, *, cuda: bool) -> str:
    """fp16 autocast needs a GPU; on CPU it falls back to fp32 with a warning (bf16 works on CPU)."""
    if requested == "fp16" and not cuda:
        log.warning("precision.mixed_precision 'fp16' needs a CUDA device; training in fp32 on CPU "
                    "(use 'bf16' for reduced precision on CPU)")
        return "no"
    return requested


def needs_unused_parameter_search(spec: JobSpec) -> bool:
    """Whether some adapter parameters can get no gradient in a step, which DDP must be told about:
    module dropout skips whole modules; text-encoder layers past the one read (SDXL's penultimate
    layer, clip_skip > 1) never contribute to the loss."""
    te_layers_unused = train_text_encoder(spec) and (spec.model.arch == "sdxl" or (spec.model.clip_skip or 1) > 1)
    return bool(spec.network.module_dropout) or te_layers_unused


def make_accelerator(spec: JobSpec) -> Any:
    """The Accelerator for a spec: CPU unless CUDA is there and the spec asks for GPUs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available() and spec.resources.gpus > 0
    mixed = effective_mixed_precision(spec.precision.mixed_precision, cuda=cuda)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=needs_unused_parameter_search(spec))
    # torch_compile is the recipe's own (trainer.train.compiled), not accelerate's: it compiles the step's
    # forward and loss rather than the module, and measures the compile time.
    return Accelerator(gradient_accumulation_steps=spec.training.gradient_accumulation_steps,
                       mixed_precision=mixed, cpu=not cuda, kwargs_handlers=[ddp], dynamo_backend="no")


def configure_attention(unet: nn.Module, attention: str) -> None:
    """sdpa (diffusers' default processor), xformers (if installed), or the classic processor."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise JobFailure(Reason.SPEC_INVALID, "precision.attention 'xformers' needs the xformers package, which "
                             "this trainer image does not have; use 'sdpa' (as fast on current PyTorch)") from None
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "default":
        unet.set_attn_processor(AttnProcessor())
    else:
        if attention == "mem_eff_attn":
            log.info("precision.attention 'mem_eff_attn': using PyTorch SDPA, which includes memory-efficient kernels")
        unet.set_attn_processor(AttnProcessor2_0())


def enable_gradient_checkpointing(parts: Any, *, train_te: bool) -> None:
    parts.unet.enable_gradient_checkpointing()
    parts.unet.train()  # diffusers checkpoints only in training mode (sd-scripts does the same)
    if train_te:
        for te in parts.text_encoders:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            te.train()


def _te_lr(spec: JobSpec) -> float | list[float]:
    lr = spec.optimizer.text_encoder_lr
    return spec.optimizer.learning_rate if lr is None else lr


def prepare_model(spec: JobSpec, parts: Any, network: Any, device: torch.device, *, train_te: bool,
                  load_weights: bool = True) -> DiffusionModel:
    """The module a step trains: frozen parts on `device`, the spec's attention, the adapter hooked in
    (initial `network.weights` loaded unless `load_weights` is off, e.g. when resuming) in its full
    dtype, gradient checkpointing as asked. The loop and `bench/train.py` share it."""
    prec = spec.precision
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        module.requires_grad_(False)
        module.to(device)
        module.eval()
    configure_attention(parts.unet, prec.attention)
    network.apply_to()
    weights = network.spec.weights
    if weights and load_weights:
        network.load_weights(weights)
    full_dtype = torch.bfloat16 if prec.full_bf16 else torch.float16 if prec.full_fp16 else torch.float32
    network.to(device=device, dtype=full_dtype)
    network.train()
    if spec.training.gradient_checkpointing:
        enable_gradient_checkpointing(parts, train_te=train_te)
    return DiffusionModel(parts, network, train_te=train_te, clip_skip=spec.model.clip_skip,
                          max_token_length=spec.dataset.max_token_length)


@torch.no_grad()
def build_text_cache(model: DiffusionModel, dataset: Any, device: torch.device) -> dict[str, tuple[torch.Tensor, Any]]:
    """Text-encoder outputs per image (captions are fixed: the spec refuses shuffle/dropout with it)."""
    out: dict[str, tuple[torch.Tensor, Any]] = {}
    rng = random.Random(0)
    for idx, item in enumerate(dataset.items):
        from trainer.data.dataset import ItemRef

        batch = dataset.load_batch([ItemRef(idx)], epoch=1, rng=rng, with_pixels=False)
        hidden, pooled = model.encode_text([ids.to(device) for ids in batch.input_ids])
        out[item.key] = (hidden[0].cpu(), None if pooled is None else pooled[0].cpu())
    return out


def park_idle_modules(parts: Any, device: torch.device, *, vae_idle: bool, text_encoders_idle: bool) -> None:
    """Modules the caches made idle leave the GPU, as sd-scripts does after caching (SDXL bf16: ~1.7 GiB
    of text encoders + VAE); sampling brings them back for its round (trainer.sampling.samples)."""
    if device.type != "cuda":
        return
    if vae_idle:
        parts.vae.to("cpu")
    if text_encoders_idle:
        for te in parts.text_encoders:
            te.to("cpu")
    torch.cuda.empty_cache()


def micro_batch_inputs(batch: Any, parts: Any, spec: JobSpec, cache: LatentCache | None, text_cache: dict | None,
                       device: torch.device) -> dict[str, Any]:
    """One micro-batch's tensors on the device: latents, noise, timesteps, noisy latents, the conditioning
    (`cond`) and the loss weights. The random draws happen here, eagerly, so a compiled step keeps
    eager's RNG streams."""
    tr, nz = spec.training, spec.noise
    if cache is not None:
        latents = cache.batch(batch.image_keys, batch.flipped).to(device)
    else:
        with torch.no_grad():
            vae = parts.vae
            dist = vae.encode(batch.pixel_values.to(device, vae.dtype)).latent_dist
            latents = (dist.sample() * parts.vae_scaling_factor).float()
    noise = torch.randn_like(latents)
    if nz.noise_offset:
        noise = N.apply_noise_offset(latents, noise, nz.noise_offset, nz.adaptive_noise_scale)
    elif nz.multires_noise_iterations:
        noise = N.pyramid_noise_like(noise, nz.multires_noise_iterations, nz.multires_noise_discount)
    timesteps = N.sample_timesteps(latents.shape[0], tr.min_timestep, tr.max_timestep, device=device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    cond: dict[str, Any] = {}
    if text_cache is not None:
        cond["hidden"] = torch.stack([text_cache[k][0] for k in batch.image_keys]).to(device)
        if parts.arch == "sdxl":
            cond["pooled"] = torch.stack([text_cache[k][1] for k in batch.image_keys]).to(device)
    else:
        cond["input_ids"] = [ids.to(device) for ids in batch.input_ids]
    if parts.arch == "sdxl":
        cond["time_ids"] = torch.cat([batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw],
                                     dim=1).to(device, torch.float32)
    return {"noisy": noisy, "timesteps": timesteps, "latents": latents, "noise": noise, "cond": cond,
            "loss_weights": batch.loss_weights.to(device, torch.float32)}


def autocast_for(acc: Any) -> Any:
    """The accelerator's autocast as a plain `torch.autocast`, which torch.compile traces."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision))
    return torch.autocast(acc.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def prediction_loss(model: Any, parts: Any, spec: JobSpec, snr: torch.Tensor | None, autocast: Any, v_pred: bool,
                    noisy: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                    cond: dict[str, Any], loss_weights: torch.Tensor) -> torch.Tensor:
    """Prediction → weighted MSE: the pure tensor part of a step, which the compiled step compiles."""
    with autocast:
        pred = model(noisy, timesteps, **cond)
    target = N.training_target(parts.noise_scheduler, latents, noise, timesteps, v_prediction=v_pred)
    return N.weighted_loss(pred, target, timesteps, loss_weights, snr=snr, min_snr_gamma=spec.training.min_snr_gamma,
                           v_prediction=v_pred)


def micro_batch_loss(model: Any, batch: Any, parts: Any, spec: JobSpec, cache: LatentCache | None,
                     text_cache: dict | None, snr: torch.Tensor | None, device: torch.device, acc: Any,
                     v_pred: bool) -> torch.Tensor:
    """One micro-batch, eager: latents → noise → noisy latents → prediction → weighted MSE."""
    inputs = micro_batch_inputs(batch, parts, spec, cache, text_cache, device)
    return prediction_loss(model, parts, spec, snr, autocast_for(acc), v_pred, **inputs)


def write_adapter(network: Any, path: str, *, dtype: torch.dtype, metadata: dict[str, str], spec: JobSpec,
                  parts: Any) -> Any:
    """The adapter file: the network's tensors in `dtype` with ss_* and modelspec.* metadata."""
    from trainer.models.adapter_file import modelspec_metadata, save_adapter

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sv, tr = spec.save, spec.training
    timesteps = None if (tr.min_timestep, tr.max_timestep) == (0, 1000) else (tr.min_timestep, tr.max_timestep)
    header = dict(metadata)
    header.update(modelspec_metadata(
        parts.arch, bool(parts.v_parameterization), sv.title or sv.output_name, spec.dataset.resolution_wh,
        author=sv.author, description=sv.description, license=sv.license, tags=sv.tags,
        clip_skip=spec.model.clip_skip, timesteps=timesteps))
    saved = save_adapter(network.state_dict_for_save(dtype), path, metadata=header, dtype=dtype)
    zeros = list(saved.zero_tensors or [])
    if zeros and dtype == torch.float16:
        log.warning("%s: %d all-zero tensors, e.g. %s (fp16 underflows small weights; use save_precision bf16 "
                    "or fp32)", path, len(zeros), zeros[:3])
    elif zeros:
        log.info("%s: %d all-zero tensors, e.g. %s (layers that got no gradient yet)", path, len(zeros), zeros[:3])
    return saved
