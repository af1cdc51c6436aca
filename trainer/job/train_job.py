"""A `kind = "train"` job's phases: preparing (fetch model + dataset, provenance) → training, with the
status reporter and checkpoint store wired into the loop's hooks.

`Job` also carries what every kind shares (reporter, publisher, timings, the local output folder); the
other kinds' phases (merge_job, shrink_job, grid_job, caption_job) take it too. Shrinking and
publishing a trained adapter are in `trainer.job.train_outputs`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from trainer import STARTED_AT
from trainer.job.metrics_log import MetricsLog
from trainer.core.failures import JobFailure, Reason
from trainer.core.jobdir import Checkpoints, StatusReporter, with_retries
from trainer.core.spec import JobSpec
from trainer.core.status import OutputFile
from trainer.core.storage import NotFound, open_store
from trainer.job.context import RunContext
from trainer.job.publish import LocalOutput, Publisher

log = logging.getLogger("lathe.run")

PUBLISHED_LEDGER = "lathe_published.json"  # inside checkpoint state: outputs already uploaded by earlier attempts


class Job:
    """The phases of one attempt, with the status reporter and checkpoint store wired in."""

    def __init__(self, ctx: RunContext, spec: JobSpec, reporter: StatusReporter) -> None:
        self.ctx, self.spec, self.reporter = ctx, spec, reporter
        self.checkpoints = Checkpoints(ctx.jobdir.store, keep=spec.save.keep_checkpoints)
        self.publisher = Publisher(ctx.out)
        self.out_dir = ctx.work_dir / "output"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self._last_progress_write = 0.0
        self.metrics_log = MetricsLog(ctx.jobdir.store, ctx.work_dir / "metrics.jsonl", enabled=reporter.enabled)
        self._sampled_steps: set[int] = set()
        self._last_epoch: int | None = None
        self.parts: Any = None
        self.network: Any = None
        self.model_downloaded = True
        self.zero_checks: dict[str, dict] = {}  # adapter file name → its zero-tensor check
        self.base_model_sha256: str | None = None
        self.manifest_path: Path | None = None
        self.manifest_sha256: str | None = None

    # -- phases ------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        from trainer.job.fetch import ensure_model, fetch_dataset, fetch_model

        t0 = time.monotonic()
        spec, ctx = self.spec, self.ctx
        resolve, cache = ctx.jobdir.resolve_input, str(ctx.cache_dir)
        model = ensure_model(resolve(spec.model.uri), cache)
        self.timings["model_fetch_s"] = model.seconds
        self.model_downloaded = model.downloaded  # False: node-local cache hit (or a local path)
        vae_path = fetch_model(resolve(spec.model.vae), cache) if spec.model.vae else None
        weights_path = fetch_model(resolve(spec.network.weights), cache) if spec.network.weights else None
        data_sources: dict = {}
        reg_sources: dict = {}
        data_root = fetch_dataset(resolve(spec.dataset.uri), str(ctx.work_dir / "dataset"), sources=data_sources)
        reg_root = (fetch_dataset(resolve(spec.dataset.reg_uri), str(ctx.work_dir / "reg"), sources=reg_sources)
                    if spec.dataset.reg_uri else None)
        self.timings["fetch_s"] = time.monotonic() - t0
        self._record_provenance(model.path, data_root, data_sources, reg_root, reg_sources)
        return {"model": model.path, "vae": vae_path, "weights": weights_path, "data": data_root, "reg": reg_root}

    def _record_provenance(self, model_path: str, data_root: str, data_sources: dict, reg_root: str | None,
                           reg_sources: dict) -> None:
        """The base model's sha256 and the dataset manifest (trainer/job/provenance.py), for metadata.json."""
        from trainer.job.provenance import (
            MANIFEST_NAME,
            base_model_sha256,
            dataset_entry,
            manifest_bytes,
        )

        if not self.ctx.is_main:
            return  # rank 0 alone publishes
        t0 = time.monotonic()
        ds = self.spec.dataset
        self.base_model_sha256 = base_model_sha256(model_path, str(self.ctx.cache_dir))
        entries = [dataset_entry("dataset.uri", ds.uri, data_root, data_sources)]
        if reg_root is not None and ds.reg_uri:
            entries.append(dataset_entry("dataset.reg_uri", ds.reg_uri, reg_root, reg_sources))
        if ds.expect_manifest:
            self._check_rerun(ds.expect_manifest, entries)
        body = manifest_bytes(entries)
        self.manifest_path = self.out_dir / MANIFEST_NAME
        self.manifest_path.write_bytes(body)
        self.manifest_sha256 = hashlib.sha256(body).hexdigest()
        self.timings["provenance_s"] = time.monotonic() - t0

    def _check_rerun(self, uri: str, entries: list[dict]) -> None:
        import json

        from trainer.job.provenance import manifest_changes

        parent, name = uri.rsplit("/", 1)
        store = open_store(parent if "://" in uri else self.ctx.jobdir.resolve_input(parent))
        try:
            expected = json.loads(with_retries(lambda: store.get_bytes(name), what="reading the expected manifest"))
        except NotFound:
            raise JobFailure(Reason.SPEC_INVALID, f"dataset.expect_manifest: {uri} does not exist") from None
        changes = manifest_changes(expected, entries)
        if changes:
            shown = "; ".join(changes[:10]) + (f"; and {len(changes) - 10} more" if len(changes) > 10 else "")
            raise JobFailure(Reason.DATASET_CHANGED, f"the dataset differs from the job this one reruns ({shown}); "
                             "rerun with --force to train on the data as it is now")

    def train(self, inputs: dict[str, Any]) -> Any:
        """Load, resume from the newest valid checkpoint if any, run the loop; the loop's result."""
        log.info("loading the model")  # torch and the diffusion stack are imported first: the slow part of a start
        from trainer.train.loop import LoopHooks
        from trainer.train.recipe import run_training

        spec, ctx = self.spec, self.ctx
        accelerator, dataset = self._load(inputs)
        resume_dir = self._resume()
        every = spec.save.checkpoint_every_n_steps
        hooks = LoopHooks(
            on_step=self._on_step,
            should_stop=self._should_stop,
            on_save=self._on_save,
            checkpoint_due=lambda s: bool(self._should_stop()) or bool(every and s % every == 0),
            on_checkpoint=self._on_checkpoint,
            warn=self.reporter.warn,
            on_plan=lambda steps, epochs: self.reporter.progress(total_steps=steps, total_epochs=epochs),
        )
        self.reporter.set_phase("training")
        if spec.sample.at_first and resume_dir is None:
            self._sample(0)
        t1 = time.monotonic()
        result = run_training(spec, self.parts, self.network, dataset, out_dir=str(self.out_dir),
                              work_dir=str(ctx.work_dir), hooks=hooks, resume_from=resume_dir,
                              seed=ctx.seed(spec), accelerator=accelerator)
        self.timings["train_s"] = time.monotonic() - t1
        if "compile_s" in result.timings:
            self.timings["compile_s"] = result.timings["compile_s"]
        if spec.sample.prompts and not result.stopped and result.steps_done not in self._sampled_steps:
            self._sample(result.steps_done)  # sd-scripts also samples at the end of training
        if result.stopped:
            reason = Reason.CANCELLED if result.stopped == "cancelled" else Reason.PREEMPTED
            raise JobFailure(reason, f"stopped at step {result.steps_done} ({result.stopped}); checkpoint saved")
        return result

    def _load(self, inputs: dict[str, Any]) -> tuple[Any, Any]:
        """The model (`self.parts`), the dataset and the network (`self.network`); (accelerator, dataset).
        `load_s` times the loading, not the imports before it."""
        import torch

        from trainer.core.dataset.layout import discover_layout
        from trainer.core.spec import train_text_encoder, train_unet
        from trainer.data.dataset import TrainDataset
        from trainer.models.load import load_model
        from trainer.models.network import build_network
        from trainer.train.loop import make_accelerator, seed_everything

        spec = self.spec
        t0 = time.monotonic()
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision.mixed_precision]
        if not torch.cuda.is_available() and weight_dtype == torch.float16:
            weight_dtype = torch.float32  # fp16 matmuls are not supported on CPU; the loop warns
        model_spec = msgspec.structs.replace(spec.model, uri=inputs["model"], vae=inputs["vae"])
        vae_dtype = torch.float32 if (spec.model.no_half_vae or weight_dtype == torch.float32) else weight_dtype
        # The Accelerator comes first: under `accelerate launch` it joins the process group and selects
        # this rank's GPU, so each rank loads the model onto its own device (not all onto cuda:0) and
        # the ranks can share their sample listings from the first (at_first) round on.
        accelerator = make_accelerator(spec)
        parts = self.parts = load_model(model_spec, weight_dtype=weight_dtype, vae_dtype=vae_dtype,
                                        device=accelerator.device)
        layout = discover_layout(spec, _list_files(inputs["data"]), _list_files(inputs["reg"]) if inputs["reg"] else None)
        for w in layout.warnings:
            self.reporter.warn(w)
        dataset = TrainDataset(layout, spec, inputs["data"], tokenizers=parts.tokenizers,
                               max_token_length=spec.dataset.max_token_length or 75, reg_root=inputs["reg"])
        for problem in getattr(dataset, "problems", []):
            self.reporter.warn(str(problem))
        network_spec = spec.network if not inputs["weights"] else msgspec.structs.replace(spec.network, weights=inputs["weights"])
        # The adapter's initial weights follow the job's seed (as in sd-scripts), the same on every rank:
        # unseeded, torch starts each process from a random seed and no two runs begin alike.
        seed_everything(self.ctx.seed(spec))
        self.network = build_network(network_spec, parts, train_unet=train_unet(spec),
                                     train_text_encoder=train_text_encoder(spec))
        self.timings["load_s"] = time.monotonic() - t0
        return accelerator, dataset

    def _resume(self) -> str | None:
        """The newest valid checkpoint downloaded into the work folder (and its ledger of outputs
        already published), or None for a fresh start."""
        ctx = self.ctx
        step = self.checkpoints.latest()
        if step is None:
            return None
        resume_dir = str(ctx.work_dir / f"resume-{step}")
        self.checkpoints.download(step, resume_dir)
        ledger = Path(resume_dir) / PUBLISHED_LEDGER
        if ledger.exists():
            for item in msgspec.json.decode(ledger.read_bytes(), type=list[OutputFile]):
                ctx.published[item.name] = item
        log.info("resuming from checkpoint at step %d", step)
        self.reporter.warn(f"attempt {ctx.attempt} resumed from the checkpoint at step {step}")
        return resume_dir

    # -- hooks -------------------------------------------------------------------------------
    def _on_step(self, step: int, total: int, epoch: int, loss: float, avg_loss: float,
                 lrs: dict[str, float], it_per_s: float) -> None:
        if "first_step_s" not in self.timings:  # process start → first optimizer step of this attempt
            self.timings["first_step_s"] = time.time() - STARTED_AT
        sample = self.spec.sample
        if sample.prompts:
            epoch_done = self._last_epoch is not None and epoch != self._last_epoch
            if (sample.every_n_steps and step % sample.every_n_steps == 0) or (
                    sample.every_n_epochs and epoch_done and self._last_epoch % sample.every_n_epochs == 0):
                self._sample(step)
        self._last_epoch = epoch
        self.metrics_log.record(step, total, epoch, loss, next(iter(lrs.values()), None) if lrs else None)
        now = time.monotonic()
        if now - self._last_progress_write < 1.0 and step < total:
            return
        self._last_progress_write = now
        lr = next(iter(lrs.values()), None) if lrs else None
        eta = (total - step) / it_per_s if it_per_s > 0 else None
        self.reporter.progress(step=step, total_steps=total, epoch=epoch, loss=loss, avg_loss=avg_loss,
                               lr=lr, it_per_s=it_per_s, eta_s=eta)

    def _sample(self, step: int) -> None:
        from trainer.sampling.samples import generate_samples

        spec, ctx = self.spec, self.ctx
        self._sampled_steps.add(step)
        folder = ctx.work_dir / "samples" / f"{step:06d}"
        mine: list[OutputFile] = []
        files = generate_samples(self.parts, spec.sample.prompts, spec.sample.sampler, str(folder), step=step,
                                 clip_skip=spec.model.clip_skip, rank=ctx.rank, world_size=ctx.world_size,
                                 base_seed=ctx.seed(spec))
        for path in files:  # each rank uploads its own share
            item = LocalOutput(str(path), f"samples/{step:06d}/{path.name}", "sample")
            try:
                ctx.published[item.name] = self.publisher.upload(item)
                mine.append(ctx.published[item.name])
            except JobFailure as exc:
                log.warning("sample upload failed: %s", exc)
        # Rank 0 alone writes the checkpoint ledger and metadata.json, so it must know the other ranks'
        # shares too (every rank samples at the same steps, so all of them reach this collective).
        for item in _gather_from_ranks(mine, ctx.world_size):
            ctx.published[item.name] = item

    def _should_stop(self) -> str | None:
        if self.ctx.stop_signal:
            return "preempted"
        if self.reporter.cancel_requested:
            return "cancelled"
        return None

    def _on_save(self, path: str, kind: str) -> None:
        if kind == "final" or not self.ctx.is_main:
            return  # the final file is published after shrinking
        item = LocalOutput(path, os.path.basename(path), f"adapter_{kind}")
        self.check_zeros(path, item.name)
        self.ctx.published[item.name] = self.publisher.upload(item)

    def check_zeros(self, path: str, name: str) -> None:
        """Record (for metadata.json) and warn about an adapter file whose tensors are all zero."""
        from trainer.models.adapter_file import zero_tensor_check

        check = zero_tensor_check(path)
        self.zero_checks[name] = check.summary()
        message = check.warning(name)
        if message:
            log.warning(message)
            self.reporter.warn(message)

    def _on_checkpoint(self, state_dir: str, step: int) -> None:
        if not self.ctx.is_main:
            return
        log.info("saving a checkpoint at step %d", step)
        ledger = sorted(self.ctx.published.values(), key=lambda o: o.name)
        Path(state_dir, PUBLISHED_LEDGER).write_bytes(msgspec.json.encode(ledger))
        self.checkpoints.save(state_dir, step, attempt=self.ctx.attempt)
        log.info("checkpoint at step %d saved", step)


def _gather_from_ranks(items: list[OutputFile], world_size: int) -> list[OutputFile]:
    """Every rank's `items`, on every rank (just `items` in a single-process run)."""
    if world_size <= 1:
        return items
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        log.warning("%d processes but no process group: rank 0 lists only its own sample images", world_size)
        return items
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [msgspec.to_builtins(o) for o in items])
    return [msgspec.convert(o, OutputFile) for part in gathered for o in part]


def _list_files(root: str) -> list[str]:
    base = Path(root)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
