"""The training loop on accelerate: one process per device, a step is one optimizer update.

setup (precision, attention, checkpointing, caches, optimizer, scheduler, resume) → epochs of
bucketed batches → saves (every N epochs/steps, keep last N, final) → result. sd-scripts'
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

import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from trainer.core.failures import JobFailure, Reason
from trainer.core.spec import JobSpec, total_steps, train_text_encoder, warmup_steps
from trainer.models.adapter_file import SAVE_DTYPES
from trainer.train import noise as N
from trainer.train import saving
from trainer.train.latents import LatentCache, build_latent_cache
from trainer.train.metadata import RunFacts, ss_metadata, stamp
from trainer.train.optim import BuiltOptimizer, build_optimizer, current_lrs
from trainer.train.schedule import build_scheduler
from trainer.train.state import Progress, load_training_state, read_progress, save_training_state
from trainer.train.tblog import TensorBoardLog, log_dir

log = logging.getLogger("lathe.train")



@dataclass
class LoopHooks:
    """Callbacks for the job runner; all optional.

    on_step runs on every rank after each step (the runner reports from rank 0 and renders its
    share of sample images on each); should_stop / checkpoint_due are asked on every rank but rank
    0's answer is what all ranks act on; on_save / on_checkpoint run on rank 0 only."""

    on_step: Callable[[int, int, int, float, float, dict[str, float], float], None] | None = None
    should_stop: Callable[[], str | None] | None = None
    on_save: Callable[[str, str], None] | None = None
    checkpoint_due: Callable[[int], bool] | None = None
    on_checkpoint: Callable[[str, int], None] | None = None


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
    # torch_compile: accelerate compiles what `prepare` gets (the UNet with the adapter hooked in), as
    # sd-scripts' --torch_compile does through its Accelerator.
    dynamo = spec.precision.dynamo_backend if spec.precision.torch_compile else "no"
    return Accelerator(gradient_accumulation_steps=spec.training.gradient_accumulation_steps,
                       mixed_precision=mixed, cpu=not cuda, kwargs_handlers=[ddp], dynamo_backend=dynamo)


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
    weights = getattr(getattr(network, "spec", None), "weights", None)
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


class _Prefetcher:
    """Loads the next batches in background threads while the current step computes."""

    def __init__(self, load: Callable[[int], Any], count: int, workers: int) -> None:
        self._load, self._count = load, count
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self._pending: dict[int, Any] = {}
        self._depth = max(1, workers)

    def get(self, index: int) -> Any:
        if self._pool is None:
            return self._load(index)
        for ahead in range(index, min(self._count, index + self._depth + 1)):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(self._load, ahead)
        return self._pending.pop(index).result()

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending.values():
                fut.cancel()
            self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The loop


def run_training(spec: JobSpec, parts: Any, network: Any, dataset: Any, *, out_dir: str, work_dir: str,
                 hooks: LoopHooks | None = None, resume_from: str | None = None, accelerator: Any = None,
                 seed: int, latent_cache_dir: str | None = None) -> TrainResult:
    """Train `network` on `dataset`; write adapter files into `out_dir` (rank 0) and logs, caches and
    checkpoint states under `work_dir`. `latent_cache_dir` (default `$LATHE_CACHE_DIR/latents`, else
    `<work_dir>/cache/latents`) holds the disk latent cache when `cache_latents_to_disk` is set."""
    hooks = hooks or LoopHooks()
    timings: dict[str, float] = {}
    t_setup = time.monotonic()
    acc = accelerator or make_accelerator(spec)
    rank, world, device, is_main = acc.process_index, acc.num_processes, acc.device, acc.is_main_process
    tr, prec, opt_spec, save_spec = spec.training, spec.precision, spec.optimizer, spec.save
    bs, ga = tr.batch_size, tr.gradient_accumulation_steps
    train_te = train_text_encoder(spec) and any(n for k, n in network.modules_count().items() if k != "unet")
    v_pred = bool(parts.v_parameterization)

    steps_per_epoch = dataset.steps_per_epoch(bs, world, ga)
    total = total_steps(spec, steps_per_epoch)
    num_epochs = math.ceil(total / steps_per_epoch)
    warmup = warmup_steps(spec, total)
    if is_main:
        log.info("training: %d steps, %d epochs of %d steps, batch %d × %d processes × %d accumulation",
                 total, num_epochs, steps_per_epoch, bs, world, ga)

    # -- models ---------------------------------------------------------------------------------
    model = prepare_model(spec, parts, network, device, train_te=train_te, load_weights=resume_from is None)

    # -- caches ---------------------------------------------------------------------------------
    cache: LatentCache | None = None
    cache_stats: dict[str, int] = {}
    if prec.cache_latents:
        t0 = time.monotonic()
        disk = None
        if prec.cache_latents_to_disk:
            root = latent_cache_dir or (os.path.join(os.environ["LATHE_CACHE_DIR"], "latents")
                                        if os.environ.get("LATHE_CACHE_DIR") else os.path.join(work_dir, "cache", "latents"))
            disk = root
        # With a disk cache rank 0 encodes first and the others read its entries.
        with acc.main_process_first() if disk else contextlib.nullcontext():
            cache = build_latent_cache(dataset, parts.vae, parts.vae_scaling_factor, disk_dir=disk)
        cache_stats = cache.stats.as_dict()
        timings["cache_latents_s"] = time.monotonic() - t0
        if is_main:
            log.info("latent cache: %s", cache_stats)
    text_cache = None
    if prec.cache_text_encoder_outputs:
        t0 = time.monotonic()
        text_cache = build_text_cache(model, dataset, device)
        timings["cache_text_s"] = time.monotonic() - t0

    park_idle_modules(parts, device, vae_idle=cache is not None, text_encoders_idle=text_cache is not None and not train_te)

    # -- optimizer, scheduler, accelerate -------------------------------------------------------
    groups = network.param_groups(unet_lr=opt_spec.unet_lr if opt_spec.unet_lr is not None else opt_spec.learning_rate,
                                  text_encoder_lr=_te_lr(spec))
    built: BuiltOptimizer = build_optimizer(opt_spec, groups)
    scheduler = build_scheduler(spec.scheduler, built.optimizer, total_steps=total, warmup_steps=warmup,
                                relative_step_lr=built.relative_step_lr)
    # The scheduler stays unprepared: it is stepped once per optimizer update on every rank.
    model, optimizer = acc.prepare(model, built.optimizer)
    trainable = [p for p in network.parameters() if p.requires_grad]

    noise_scheduler = parts.noise_scheduler
    snr = N.all_snr(noise_scheduler.alphas_cumprod).to(device) if tr.min_snr_gamma else None

    # -- resume ---------------------------------------------------------------------------------
    session_id = random.Random(derived_seed("session", seed, time.time_ns())).randint(0, 2**32)
    started_at = time.time()
    step, start_epoch, skip_batches, history = 0, 1, 0, []
    if resume_from:
        peek = read_progress(resume_from)
        if peek.total_steps != total:
            log.warning("the checkpoint was made for %d steps, this run has %d", peek.total_steps, total)
        if peek.world_size != world:
            log.warning("the checkpoint was made with %d processes, this run has %d: the epoch's remaining batches "
                        "are dealt anew", peek.world_size, world)
        progress = load_training_state(resume_from, network=network, optimizer=optimizer, scheduler=scheduler, rank=rank)
        step, start_epoch, history = progress.step, progress.epoch, list(progress.loss_history)
        skip_batches = progress.batch_in_epoch if progress.world_size == world else 0
        session_id, started_at = progress.session_id or session_id, progress.training_started_at or started_at
        if is_main:
            log.info("resumed at step %d (epoch %d, batch %d)", step, start_epoch, skip_batches)

    facts = RunFacts(session_id=session_id, training_started_at=started_at,
                     num_batches_per_epoch=dataset.num_batches(bs), num_epochs=num_epochs, max_train_steps=total,
                     optimizer=built.ss_optimizer, seed=seed, mixed_precision=acc.mixed_precision, world_size=world)
    meta = ss_metadata(spec, parts, network, dataset, facts) if is_main else {}
    tb = TensorBoardLog(log_dir(work_dir, spec.logging.log_prefix) if is_main and spec.logging.log_with == "tensorboard"
                        else None)
    save_dtype = SAVE_DTYPES[save_spec.save_precision or "fp32"]  # None: the trained dtype
    saved: list[str] = []
    timings["setup_s"] = time.monotonic() - t_setup
    save_time = 0.0

    def save(kind: str, name: str, epoch_no: int) -> str | None:
        nonlocal save_time
        if not is_main:
            return None
        t0 = time.monotonic()
        path = os.path.join(out_dir, name)
        write_adapter(network, path, dtype=save_dtype, metadata=stamp(meta, steps=step, epoch=epoch_no),
                      spec=spec, parts=parts)
        saved.append(path)
        if hooks.on_save:
            hooks.on_save(path, kind)
        removed = saving.prune(out_dir, save_spec.output_name, keep_epochs=save_spec.save_last_n_epochs,
                               keep_steps=save_spec.save_last_n_steps)
        saved[:] = [p for p in saved if os.path.basename(p) not in removed]
        save_time += time.monotonic() - t0
        return path

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        state_dir = os.path.join(work_dir, "state", f"step-{step:08d}")
        if os.path.isdir(state_dir):
            shutil.rmtree(state_dir)
        acc.wait_for_everyone()
        save_training_state(state_dir, network_state=network.state_dict(), optimizer=optimizer, scheduler=scheduler,
                            progress=Progress(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, total_steps=total,
                                              seed=seed, world_size=world, loss_history=history,
                                              session_id=session_id, training_started_at=started_at),
                            rank=rank, write_shared=is_main)
        acc.wait_for_everyone()
        if is_main:
            if hooks.on_checkpoint:
                hooks.on_checkpoint(state_dir, step)
            for old in os.listdir(os.path.dirname(state_dir)):  # keep only the newest state locally
                if old != os.path.basename(state_dir):
                    shutil.rmtree(os.path.join(os.path.dirname(state_dir), old), ignore_errors=True)
        acc.wait_for_everyone()

    def agreed(flag: float) -> float:
        """Rank 0's value on every rank (decisions that must not diverge)."""
        if world == 1:
            return flag
        t = torch.tensor([flag if is_main else 0.0], device=device, dtype=torch.float32)
        return float(acc.reduce(t, reduction="sum").item())

    def any_rank(flag: float) -> float:
        """The largest value among all ranks: a SIGTERM to any rank's pod stops every rank."""
        if world == 1:
            return flag
        return float(acc.gather(torch.tensor([flag], device=device, dtype=torch.float32)).max().item())

    def micro_batch(refs: list[Any], epoch: int, index: int) -> Any:
        rng = random.Random(f"lathe-batch:{seed}:{epoch}:{rank}:{index}")
        return dataset.load_batch(refs, epoch=epoch, rng=rng, with_pixels=cache is None)

    # -- train ----------------------------------------------------------------------------------
    stopped: str | None = None
    epoch = start_epoch
    t_train = time.monotonic()
    steps_this_session = 0
    window = max(1, steps_per_epoch)
    try:
        for epoch in range(start_epoch, num_epochs + 1):
            if step >= total:
                break
            batches = dataset.epoch_batches(epoch, seed=seed, batch_size=bs, rank=rank, world_size=world)
            first = skip_batches if epoch == start_epoch else 0
            prefetch = _Prefetcher(lambda i, e=epoch, b=batches: micro_batch(b[i], e, i), len(batches),
                                   min(spec.dataset.max_data_loader_n_workers, 4))
            try:
                position = first
                while position < len(batches) and step < total:
                    chunk = list(range(position, min(position + ga, len(batches))))
                    losses: list[float] = []
                    bad = False
                    for k, index in enumerate(chunk):
                        batch = prefetch.get(index)
                        seed_micro = derived_seed("micro", seed, rank, step, k)
                        random.seed(seed_micro)
                        np.random.seed(seed_micro % 2**32)
                        torch.manual_seed(seed_micro)
                        sync = k == len(chunk) - 1
                        with (contextlib.nullcontext() if sync else acc.no_sync(model)):
                            loss = micro_batch_loss(model, batch, parts, spec, cache, text_cache, snr, device, acc, v_pred)
                            if not torch.isfinite(loss):
                                bad = True
                                if world == 1:
                                    break
                            acc.backward(loss)
                        losses.append(float(loss.detach()))
                    if agreed(float(bad)) or any(not math.isfinite(x) for x in losses) or bad:
                        raise JobFailure(Reason.NAN_LOSS, f"loss became nan/inf at step {step + 1}; lower the learning "
                                         "rate, use mixed_precision 'bf16' instead of 'fp16', or set "
                                         "optimizer.max_grad_norm")
                    if opt_spec.max_grad_norm > 0:
                        acc.clip_grad_norm_(trainable, opt_spec.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    max_norm = None
                    if opt_spec.scale_weight_norms:
                        max_norm = network.apply_max_norm(opt_spec.scale_weight_norms, device)
                    step += 1
                    steps_this_session += 1
                    position = chunk[-1] + 1
                    step_loss = sum(losses) / len(losses)
                    history.append(step_loss)
                    recent = history[-window:]
                    avg = sum(recent) / len(recent)
                    lrs = current_lrs(built, scheduler)
                    it_per_s = steps_this_session / max(1e-9, time.monotonic() - t_train)
                    if is_main and step % spec.logging.log_every_n_steps == 0:
                        tb.step(step, loss=step_loss, avg_loss=avg, lrs=lrs, max_norm=max_norm)
                    if hooks.on_step:
                        hooks.on_step(step, total, epoch, step_loss, avg, lrs, it_per_s)
                    if saving.step_save_due(step, total, save_spec.save_every_n_steps):
                        save("step", saving.step_file_name(save_spec.output_name, step), epoch)
                    reason = hooks.should_stop() if hooks.should_stop else None
                    codes = {"cancelled": 1.0, "preempted": 2.0}
                    code = any_rank(codes.get(reason or "", 0.0))
                    stop = {1.0: "cancelled", 2.0: "preempted"}.get(code)
                    due = bool(hooks.checkpoint_due(step)) if hooks.checkpoint_due else False
                    if (agreed(float(due)) or stop) and step < total:
                        done_epoch = position >= len(batches)
                        checkpoint(epoch + 1 if done_epoch else epoch, 0 if done_epoch else position)
                    if stop:
                        stopped = stop
                        break
            finally:
                prefetch.close()
            if stopped:
                break
            if history:
                epoch_losses = history[-max(1, min(len(history), steps_per_epoch)):]
                tb.epoch(epoch, sum(epoch_losses) / len(epoch_losses))
            if saving.epoch_save_due(epoch, num_epochs, save_spec.save_every_n_epochs) and step < total:
                save("epoch", saving.epoch_file_name(save_spec.output_name, epoch), epoch)
        timings["train_s"] = time.monotonic() - t_train - save_time
        final_path = None
        if not stopped:
            acc.wait_for_everyone()
            final_path = save("final", saving.final_file_name(save_spec.output_name), min(epoch, num_epochs))
    finally:
        tb.close()
    timings["save_s"] = save_time
    recent = history[-window:]
    return TrainResult(
        final_path=final_path if is_main else None, steps_done=step, epochs_done=min(epoch, num_epochs),
        loss_history=history, avg_loss=(sum(recent) / len(recent)) if recent else float("nan"), stopped=stopped,
        saved_files=list(saved), timings=timings, ss_metadata=stamp(meta, steps=step, epoch=min(epoch, num_epochs))
        if is_main else {}, cache_stats=cache_stats,
    )


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


def micro_batch_loss(model: Any, batch: Any, parts: Any, spec: JobSpec, cache: LatentCache | None,
                     text_cache: dict | None, snr: torch.Tensor | None, device: torch.device, acc: Any,
                     v_pred: bool) -> torch.Tensor:
    """One micro-batch: latents → noise → noisy latents → prediction → weighted MSE."""
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
    kwargs: dict[str, Any] = {}
    if text_cache is not None:
        kwargs["hidden"] = torch.stack([text_cache[k][0] for k in batch.image_keys]).to(device)
        if parts.arch == "sdxl":
            kwargs["pooled"] = torch.stack([text_cache[k][1] for k in batch.image_keys]).to(device)
    else:
        kwargs["input_ids"] = [ids.to(device) for ids in batch.input_ids]
    if parts.arch == "sdxl":
        kwargs["time_ids"] = torch.cat([batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw],
                                       dim=1).to(device, torch.float32)
    with acc.autocast():
        pred = model(noisy, timesteps, **kwargs)
    target = N.training_target(parts.noise_scheduler, latents, noise, timesteps, v_prediction=v_pred)
    return N.weighted_loss(pred, target, timesteps, batch.loss_weights, snr=snr, min_snr_gamma=tr.min_snr_gamma,
                           v_prediction=v_pred)


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
