"""The training run as a recipe: setup → resume → epochs of steps → saves and checkpoints → result.

`TrainingRecipe` holds what the phases share (accelerator, model, optimizer, caches, progress) so each
phase is a short method. `step` is one micro-batch's forward and backward and nothing else: RNG
reseeding, DDP's no_sync, reading the loss back to the host, NaN checks, logging and hooks stay in
its callers, so the step itself keeps no host synchronisation and can be compiled on its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from typing import Any

import numpy as np
import torch

from trainer.core.settings import trainer_settings
from trainer.core.spec import JobSpec, compile_choice, total_steps, train_text_encoder, warmup_steps
from trainer.models.adapter_file import SAVE_DTYPES
from trainer.train import noise as N
from trainer.train import saving
from trainer.train.compiled import TimedCompile, cuda_speedups, place_compile_cache
from trainer.train.latents import LatentCache, build_latent_cache
from trainer.train.loop import (LoopHooks, TrainResult, _te_lr, autocast_for, build_text_cache,
                                derived_seed, make_accelerator, micro_batch_inputs, park_idle_modules, prediction_loss,
                                prepare_model, write_adapter)
from trainer.train.lossbuf import LossBuffer, first_bad_step, nan_failure
from trainer.train.metadata import RunFacts, ss_metadata, stamp
from trainer.train.optim import build_optimizer, current_lrs
from trainer.train.prefetch import Prefetcher
from trainer.train.schedule import build_scheduler
from trainer.train.state import Progress, load_training_state, read_progress, save_training_state
from trainer.train.tblog import TensorBoardLog, log_dir

log = logging.getLogger("lathe.train")

_STOP_CODES = {"cancelled": 1.0, "preempted": 2.0}


def _model_cache_root() -> str:
    """The node's cache volume, where the model fetch keeps base models."""
    return str(trainer_settings().model_cache())


class TrainingRecipe:
    """One training run of `network` on `dataset`: `setup()`, then `train()` (or both: `run()`)."""

    def __init__(self, spec: JobSpec, parts: Any, network: Any, dataset: Any, *, out_dir: str, work_dir: str,
                 hooks: LoopHooks | None = None, resume_from: str | None = None, accelerator: Any = None,
                 seed: int, latent_cache_dir: str | None = None) -> None:
        self.spec, self.parts, self.network, self.dataset = spec, parts, network, dataset
        self.out_dir, self.work_dir, self.seed = out_dir, work_dir, seed
        self.hooks = hooks or LoopHooks()
        self.resume_from, self.latent_cache_dir = resume_from, latent_cache_dir
        self.acc = accelerator
        self.timings: dict[str, float] = {}
        self.saved: list[str] = []
        self.save_time = 0.0
        self.cache: LatentCache | None = None
        self.cache_stats: dict[str, int] = {}
        self.text_cache: dict | None = None

    def run(self) -> TrainResult:
        self.setup()
        return self.train()

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Models, caches, optimizer and scheduler under accelerate, resumed progress, header metadata."""
        t_setup = time.monotonic()
        self._setup_plan()
        self.model = prepare_model(self.spec, self.parts, self.network, self.device, train_te=self.train_te,
                                   load_weights=self.resume_from is None)
        self._setup_caches()
        park_idle_modules(self.parts, self.device, vae_idle=self.cache is not None,
                          text_encoders_idle=self.text_cache is not None and not self.train_te)
        self._setup_optimizer()
        self._setup_step()
        self.resume()
        self._setup_outputs()
        self.timings["setup_s"] = time.monotonic() - t_setup

    def _setup_plan(self) -> None:
        """The accelerator, this process's place in it, and the run's length in steps and epochs."""
        spec, network = self.spec, self.network
        self.acc = acc = self.acc or make_accelerator(spec)
        self.rank, self.world, self.device, self.is_main = (acc.process_index, acc.num_processes, acc.device,
                                                            acc.is_main_process)
        tr = spec.training
        self.train_te = train_text_encoder(spec) and any(n for k, n in network.modules_count().items() if k != "unet")
        self.v_pred = bool(self.parts.v_parameterization)
        self.steps_per_epoch = self.dataset.steps_per_epoch(tr.batch_size, self.world, tr.gradient_accumulation_steps)
        self.total = total_steps(spec, self.steps_per_epoch)
        self.num_epochs = math.ceil(self.total / self.steps_per_epoch)
        self.warmup = warmup_steps(spec, self.total)
        if self.is_main:
            log.info("training: %d steps, %d epochs of %d steps, batch %d × %d processes × %d accumulation",
                     self.total, self.num_epochs, self.steps_per_epoch, tr.batch_size, self.world,
                     tr.gradient_accumulation_steps)
            if self.hooks.on_plan:
                self.hooks.on_plan(self.total, self.num_epochs)

    def _latent_disk_dir(self) -> str | None:
        if not self.spec.precision.cache_latents_to_disk:
            return None
        if self.latent_cache_dir:
            return self.latent_cache_dir
        node_cache = trainer_settings().cache_dir
        if node_cache:
            return os.path.join(node_cache, "latents")
        return os.path.join(self.work_dir, "cache", "latents")

    def _setup_caches(self) -> None:
        """Latents (memory or disk) and text-encoder outputs, as the spec asks."""
        prec = self.spec.precision
        if prec.cache_latents:
            t0 = time.monotonic()
            disk = self._latent_disk_dir()
            # With a disk cache rank 0 encodes first and the others read its entries.
            with self.acc.main_process_first() if disk else contextlib.nullcontext():
                self.cache = build_latent_cache(self.dataset, self.parts.vae, self.parts.vae_scaling_factor,
                                                disk_dir=disk)
            self.cache_stats = self.cache.stats.as_dict()
            self.timings["cache_latents_s"] = time.monotonic() - t0
            if self.is_main:
                log.info("latent cache: %s", self.cache_stats)
        if prec.cache_text_encoder_outputs:
            t0 = time.monotonic()
            self.text_cache = build_text_cache(self.model, self.dataset, self.device)
            self.timings["cache_text_s"] = time.monotonic() - t0

    def _setup_optimizer(self) -> None:
        """Optimizer and scheduler; accelerate wraps the model (DDP) and the optimizer."""
        opt_spec, network = self.spec.optimizer, self.network
        groups = network.param_groups(unet_lr=opt_spec.unet_lr if opt_spec.unet_lr is not None else opt_spec.learning_rate,
                                      text_encoder_lr=_te_lr(self.spec))
        self.built = build_optimizer(opt_spec, groups)
        self.scheduler = build_scheduler(self.spec.scheduler, self.built.optimizer, total_steps=self.total,
                                         warmup_steps=self.warmup, relative_step_lr=self.built.relative_step_lr)
        # The scheduler stays unprepared: it is stepped once per optimizer update on every rank.
        self.model, self.optimizer = self.acc.prepare(self.model, self.built.optimizer)
        self.trainable = [p for p in network.parameters() if p.requires_grad]
        alphas = self.parts.noise_scheduler.alphas_cumprod
        self.snr = N.all_snr(alphas).to(self.device) if self.spec.training.min_snr_gamma else None

    def _setup_step(self) -> None:
        """The step's forward and loss, compiled if `precision.torch_compile` says so; CUDA-only speedups; the
        loss buffer (flushed every step on CPU eager, as before; every 16 steps or once a second otherwise)."""
        cuda = self.device.type == "cuda"
        choice = compile_choice(self.spec, cuda=cuda)
        if choice.warning:
            log.warning("%s", choice.warning)
            if self.hooks.warn:
                self.hooks.warn(choice.warning)
        cuda_speedups(self.parts, self.device)
        autocast = autocast_for(self.acc)

        def loss_of(**inputs: Any) -> torch.Tensor:
            return prediction_loss(self.model, self.parts, self.spec, self.snr, autocast, self.v_pred, **inputs)

        self.compiled: TimedCompile | None = None
        self.loss_of: Any = loss_of
        if choice.on:
            place_compile_cache(_model_cache_root())
            self.compiled = self.loss_of = TimedCompile(loss_of, backend=self.spec.precision.dynamo_backend,
                                                        fullgraph=choice.fullgraph and self.world == 1, cuda=cuda)
        # Ranks must flush at the same steps (the NaN verdict is a collective): the age rule is single-process.
        fast = cuda or choice.on
        self.losses = LossBuffer(16 if fast else 1, 1.0 if self.world == 1 else None)

    def _setup_outputs(self) -> None:
        """The header metadata every save carries, the TensorBoard log, the save dtype."""
        spec, tr = self.spec, self.spec.training
        facts = RunFacts(session_id=self.session_id, training_started_at=self.started_at,
                         num_batches_per_epoch=self.dataset.num_batches(tr.batch_size), num_epochs=self.num_epochs,
                         max_train_steps=self.total, optimizer=self.built.ss_optimizer, seed=self.seed,
                         mixed_precision=self.acc.mixed_precision, world_size=self.world)
        self.meta = ss_metadata(spec, self.parts, self.network, self.dataset, facts) if self.is_main else {}
        tensorboard = self.is_main and spec.logging.log_with == "tensorboard"
        self.tb = TensorBoardLog(log_dir(self.work_dir, spec.logging.log_prefix) if tensorboard else None)
        self.save_dtype = SAVE_DTYPES[spec.save.save_precision or "fp32"]  # None: the trained dtype

    # -- resume -------------------------------------------------------------------------------
    def resume(self) -> None:
        """Progress from `resume_from` (weights, optimizer, scheduler, RNGs), else a fresh start."""
        self.session_id = random.Random(derived_seed("session", self.seed, time.time_ns())).randint(0, 2**32)
        self.started_at = time.time()
        self.step_no, self.start_epoch, self.skip_batches, self.history = 0, 1, 0, []
        if not self.resume_from:
            return
        world = self.world
        peek = read_progress(self.resume_from)
        if peek.total_steps != self.total:
            log.warning("the checkpoint was made for %d steps, this run has %d", peek.total_steps, self.total)
        if peek.world_size != world:
            log.warning("the checkpoint was made with %d processes, this run has %d: the epoch's remaining batches "
                        "are dealt anew", peek.world_size, world)
        progress = load_training_state(self.resume_from, network=self.network, optimizer=self.optimizer,
                                       scheduler=self.scheduler, rank=self.rank)
        self.step_no, self.start_epoch, self.history = progress.step, progress.epoch, list(progress.loss_history)
        self.skip_batches = progress.batch_in_epoch if progress.world_size == world else 0
        self.session_id = progress.session_id or self.session_id
        self.started_at = progress.training_started_at or self.started_at
        if self.is_main:
            log.info("resumed at step %d (epoch %d, batch %d)", self.step_no, self.start_epoch, self.skip_batches)

    # -- one step -----------------------------------------------------------------------------
    def step(self, batch: Any) -> torch.Tensor:
        """Forward and backward of one micro-batch; the detached loss, still on the device (a copy: a CUDA
        graph's output is overwritten by its next replay)."""
        inputs = micro_batch_inputs(batch, self.parts, self.spec, self.cache, self.text_cache, self.device)
        loss = self.loss_of(**inputs)
        self.acc.backward(loss)
        return loss.detach().clone()

    def _micro_batch(self, refs: list[Any], epoch: int, index: int) -> Any:
        rng = random.Random(f"lathe-batch:{self.seed}:{epoch}:{self.rank}:{index}")
        return self.dataset.load_batch(refs, epoch=epoch, rng=rng, with_pixels=self.cache is None)

    def _accumulate(self, prefetch: Prefetcher, chunk: list[int]) -> torch.Tensor:
        """The micro-batches of one optimizer update; their losses, on the device. Gradients sync on the last."""
        losses: list[torch.Tensor] = []
        for k, index in enumerate(chunk):
            batch = prefetch.get(index)
            seed_micro = derived_seed("micro", self.seed, self.rank, self.step_no, k)
            random.seed(seed_micro)
            np.random.seed(seed_micro % 2**32)
            torch.manual_seed(seed_micro)
            with contextlib.nullcontext() if k == len(chunk) - 1 else self.acc.no_sync(self.model):
                losses.append(self.step(batch))
        return torch.stack(losses)

    def _flush(self, epoch: int) -> None:
        """Reads the buffered losses back; fails on the first non-finite one (on every rank, if any rank saw
        one), else reports each flushed step."""
        flushed = self.losses.flush()
        bad = first_bad_step(flushed)
        agreed = self._agreed(float(bad or 0))
        if bad or agreed:
            raise nan_failure(bad or int(agreed))
        for (step, values), (lrs, max_norm) in zip(flushed, self.step_facts):
            self._report(epoch, step, values, lrs, max_norm)
        self.step_facts = []

    def _flush_due(self, step: int, end_of_epoch: bool) -> bool:
        """Every step whose weights someone reads (a save, a sample) or after which the run may stop flushes."""
        spec = self.spec
        return (self.losses.due() or end_of_epoch or step >= self.total or bool(spec.sample.prompts)
                or saving.step_save_due(step, self.total, spec.save.save_every_n_steps))

    def _optimizer_step(self) -> Any:
        """Clip, update, schedule, clear; then the max-norm regularisation. Its value, if any."""
        opt_spec = self.spec.optimizer
        if opt_spec.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.trainable, opt_spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if opt_spec.scale_weight_norms:
            return self.network.apply_max_norm(opt_spec.scale_weight_norms, self.device)
        return None

    def _report(self, epoch: int, step: int, losses: list[float], lrs: dict[str, float], max_norm: Any) -> None:
        """A flushed update: loss history, TensorBoard, the runner's on_step, a step save if due."""
        save_spec = self.spec.save
        step_loss = sum(losses) / len(losses)
        self.history.append(step_loss)
        avg = self._recent_average()
        it_per_s = self.steps_this_session / max(1e-9, time.monotonic() - self.t_train)
        if self.is_main and step % self.spec.logging.log_every_n_steps == 0:
            self.tb.step(step, loss=step_loss, avg_loss=avg, lrs=lrs, max_norm=max_norm)
        if self.hooks.on_step:
            self.hooks.on_step(step, self.total, epoch, step_loss, avg, lrs, it_per_s)
        if saving.step_save_due(step, self.total, save_spec.save_every_n_steps):
            self.save("step", saving.step_file_name(save_spec.output_name, step), epoch)

    def _stop_or_checkpoint(self, epoch: int, position: int, batches_in_epoch: int) -> str | None:
        """Rank 0's checkpoint decision and any rank's stop request, acted on by all ranks."""
        reason = self.hooks.should_stop() if self.hooks.should_stop else None
        code = self._any_rank(_STOP_CODES.get(reason or "", 0.0))
        stop = {1.0: "cancelled", 2.0: "preempted"}.get(code)
        due = bool(self.hooks.checkpoint_due(self.step_no)) if self.hooks.checkpoint_due else False
        due = bool(self._agreed(float(due)))
        if due or stop:
            self._flush(epoch)
        if (due or stop) and self.step_no < self.total:
            done_epoch = position >= batches_in_epoch
            self.checkpoint(epoch + 1 if done_epoch else epoch, 0 if done_epoch else position)
        return stop

    def _recent_average(self) -> float:
        recent = self.history[-max(1, self.steps_per_epoch):]
        return sum(recent) / len(recent) if recent else float("nan")

    # -- collectives --------------------------------------------------------------------------
    def _agreed(self, flag: float) -> float:
        """Rank 0's value on every rank (decisions that must not diverge)."""
        if self.world == 1:
            return flag
        t = torch.tensor([flag if self.is_main else 0.0], device=self.device, dtype=torch.float32)
        return float(self.acc.reduce(t, reduction="sum").item())

    def _any_rank(self, flag: float) -> float:
        """The largest value among all ranks: a SIGTERM to any rank's pod stops every rank."""
        if self.world == 1:
            return flag
        return float(self.acc.gather(torch.tensor([flag], device=self.device, dtype=torch.float32)).max().item())

    # -- save, checkpoint ---------------------------------------------------------------------
    def save(self, kind: str, name: str, epoch_no: int) -> str | None:
        """An adapter file in out_dir (rank 0), then keep-last-N pruning."""
        if not self.is_main:
            return None
        t0 = time.monotonic()
        save_spec = self.spec.save
        path = os.path.join(self.out_dir, name)
        write_adapter(self.network, path, dtype=self.save_dtype, metadata=stamp(self.meta, steps=self.step_no,
                      epoch=epoch_no), spec=self.spec, parts=self.parts)
        self.saved.append(path)
        if self.hooks.on_save:
            self.hooks.on_save(path, kind)
        removed = saving.prune(self.out_dir, save_spec.output_name, keep_epochs=save_spec.save_last_n_epochs,
                               keep_steps=save_spec.save_last_n_steps)
        self.saved[:] = [p for p in self.saved if os.path.basename(p) not in removed]
        self.save_time += time.monotonic() - t0
        return path

    def checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        """The full training state under work_dir/state (every rank writes its RNGs); only the newest kept."""
        acc, step = self.acc, self.step_no
        state_dir = os.path.join(self.work_dir, "state", f"step-{step:08d}")
        if os.path.isdir(state_dir):
            shutil.rmtree(state_dir)
        acc.wait_for_everyone()
        progress = Progress(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, total_steps=self.total,
                            seed=self.seed, world_size=self.world, loss_history=self.history,
                            session_id=self.session_id, training_started_at=self.started_at)
        save_training_state(state_dir, network_state=self.network.state_dict(), optimizer=self.optimizer,
                            scheduler=self.scheduler, progress=progress, rank=self.rank, write_shared=self.is_main)
        acc.wait_for_everyone()
        if self.is_main:
            if self.hooks.on_checkpoint:
                self.hooks.on_checkpoint(state_dir, step)
            parent = os.path.dirname(state_dir)
            for old in os.listdir(parent):
                if old != os.path.basename(state_dir):
                    shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
        acc.wait_for_everyone()

    # -- the epoch loop -----------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Epochs until the planned steps are done or a stop is requested; then the final save."""
        self.stopped: str | None = None
        self.epoch = self.start_epoch
        self.t_train = time.monotonic()
        self.steps_this_session = 0
        self.step_facts: list[tuple[dict[str, float], Any]] = []
        final_path = None
        try:
            for epoch in range(self.start_epoch, self.num_epochs + 1):
                self.epoch = epoch
                if self.step_no >= self.total:
                    break
                self.stopped = self._train_epoch(epoch)
                if self.stopped:
                    break
                self._end_epoch(epoch)
            self.timings["train_s"] = time.monotonic() - self.t_train - self.save_time
            if not self.stopped:
                self.acc.wait_for_everyone()
                name = saving.final_file_name(self.spec.save.output_name)
                final_path = self.save("final", name, min(self.epoch, self.num_epochs))
        finally:
            self.tb.close()
        self.timings["save_s"] = self.save_time
        if self.compiled is not None:
            self.timings["compile_s"] = self.compiled.seconds
        return self._result(final_path)

    def _train_epoch(self, epoch: int) -> str | None:
        """The updates of one epoch (from the resumed position in the first); a stop reason or None."""
        bs, ga = self.spec.training.batch_size, self.spec.training.gradient_accumulation_steps
        batches = self.dataset.epoch_batches(epoch, seed=self.seed, batch_size=bs, rank=self.rank,
                                             world_size=self.world)
        position = self.skip_batches if epoch == self.start_epoch else 0
        prefetch = Prefetcher(lambda i: self._micro_batch(batches[i], epoch, i), len(batches),
                              min(self.spec.dataset.max_data_loader_n_workers, 4))
        try:
            while position < len(batches) and self.step_no < self.total:
                chunk = list(range(position, min(position + ga, len(batches))))
                losses = self._accumulate(prefetch, chunk)
                max_norm = self._optimizer_step()
                self.step_no += 1
                self.steps_this_session += 1
                position = chunk[-1] + 1
                self.losses.push(self.step_no, losses)
                self.step_facts.append((current_lrs(self.built, self.scheduler), max_norm))
                if self._flush_due(self.step_no, position >= len(batches)):
                    self._flush(epoch)
                stop = self._stop_or_checkpoint(epoch, position, len(batches))
                if stop:
                    return stop
        finally:
            prefetch.close()
        return None

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's mean loss to TensorBoard; an epoch save if due (the last epoch's is the final save)."""
        save_spec, history = self.spec.save, self.history
        if history:
            epoch_losses = history[-max(1, min(len(history), self.steps_per_epoch)):]
            self.tb.epoch(epoch, sum(epoch_losses) / len(epoch_losses))
        if saving.epoch_save_due(epoch, self.num_epochs, save_spec.save_every_n_epochs) and self.step_no < self.total:
            self.save("epoch", saving.epoch_file_name(save_spec.output_name, epoch), epoch)

    def _result(self, final_path: str | None) -> TrainResult:
        epochs_done = min(self.epoch, self.num_epochs)
        return TrainResult(
            final_path=final_path if self.is_main else None, steps_done=self.step_no, epochs_done=epochs_done,
            loss_history=self.history, avg_loss=self._recent_average(), stopped=self.stopped,
            saved_files=list(self.saved), timings=self.timings, cache_stats=self.cache_stats,
            ss_metadata=stamp(self.meta, steps=self.step_no, epoch=epochs_done) if self.is_main else {})


def run_training(spec: JobSpec, parts: Any, network: Any, dataset: Any, *, out_dir: str, work_dir: str,
                 hooks: LoopHooks | None = None, resume_from: str | None = None, accelerator: Any = None,
                 seed: int, latent_cache_dir: str | None = None) -> TrainResult:
    """Train `network` on `dataset`; write adapter files into `out_dir` (rank 0) and logs, caches and
    checkpoint states under `work_dir`. `latent_cache_dir` (default `$LATHE_CACHE_DIR/latents`, else
    `<work_dir>/cache/latents`) holds the disk latent cache when `cache_latents_to_disk` is set."""
    return TrainingRecipe(spec, parts, network, dataset, out_dir=out_dir, work_dir=work_dir, hooks=hooks,
                          resume_from=resume_from, accelerator=accelerator, seed=seed,
                          latent_cache_dir=latent_cache_dir).run()
