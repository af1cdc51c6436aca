"""`python -m trainer run SPEC_URI`: one attempt of a job, end to end.

Phases: preparing (fetch model + dataset, build caches) → training → shrinking → uploading →
succeeded, or failed with a machine-readable reason and the matching exit code (trainer/core/failures.py).
The folder holding the spec is the job directory: status.json, cancel, checkpoints/ and logs/ live there.
Resumes from the newest valid checkpoint, so a preempted or killed attempt loses at most the steps since.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from trainer import STARTED_AT, __version__
from trainer.core.failures import SUCCESS_EXIT, JobFailure, Reason
from trainer.core.jobdir import Checkpoints, StatusReporter, with_retries
from trainer.job.publish import LocalOutput, Publisher
from trainer.core.spec import UNSHRINKABLE_ALGOS, JobSpec, SpecError, decode_spec, encode_spec, spec_hash, warnings_for
from trainer.core.status import OutputFile
from trainer.core.storage import NotFound, StorageError, Store, open_store, parse_uri
from trainer.train.saving import files_to_remove

log = logging.getLogger("lathe.run")

PUBLISHED_LEDGER = "lathe_published.json"  # inside checkpoint state: outputs already uploaded by earlier attempts


@dataclass
class RunContext:
    spec_uri: str
    job: Store                 # the job directory
    out: Store                 # the output location
    work_dir: Path
    cache_dir: Path
    attempt: int
    rank: int = 0
    world_size: int = 1
    stop_signal: str | None = None  # set by SIGTERM
    published: dict[str, OutputFile] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _job_dir_uri(spec_uri: str) -> str:
    scheme, bucket, key = parse_uri(spec_uri)
    if scheme == "s3":
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        return f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}"
    return str(Path(key).resolve().parent)


def _read_spec(spec_uri: str) -> JobSpec:
    scheme, bucket, key = parse_uri(spec_uri)
    try:
        if scheme == "s3":
            name = key.rsplit("/", 1)[-1]
            store = open_store(_job_dir_uri(spec_uri))
            data = with_retries(lambda: store.get_bytes(name), what="reading the spec")
        else:
            data = Path(key).read_bytes()
    except (NotFound, FileNotFoundError):
        raise JobFailure(Reason.SPEC_INVALID, f"no spec at {spec_uri}") from None
    try:
        return decode_spec(data, format="toml" if key.endswith(".toml") else "auto")
    except SpecError as exc:
        raise JobFailure(Reason.SPEC_INVALID, f"{spec_uri}: {exc}") from None


def _resolve_input(uri: str, spec_uri: str) -> str:
    """Relative local paths in a local spec are relative to the spec's folder (like a config file)."""
    if "://" in uri or os.path.isabs(uri) or "://" in spec_uri:
        return uri
    return str((Path(parse_uri(spec_uri)[2]).resolve().parent / uri).resolve())


def _seed(spec: JobSpec, job_uri: str) -> int:
    # No seed given: derive one from the job so every attempt (and every rank) agrees; it is recorded.
    if spec.training.seed is not None:
        return spec.training.seed
    return int(hashlib.sha256(job_uri.encode()).hexdigest()[:8], 16)


def _setup_logging(work_dir: Path, debug: bool, rank: int) -> Path:
    log_path = work_dir / ("trainer.log" if rank == 0 else f"trainer.rank{rank}.log")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in (logging.FileHandler(log_path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return log_path


class Job:
    """The phases of one attempt, with the status reporter and checkpoint store wired in."""

    def __init__(self, ctx: RunContext, spec: JobSpec, reporter: StatusReporter) -> None:
        self.ctx, self.spec, self.reporter = ctx, spec, reporter
        self.checkpoints = Checkpoints(ctx.job, keep=spec.save.keep_checkpoints)
        self.publisher = Publisher(ctx.out)
        self.out_dir = ctx.work_dir / "output"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self._last_progress_write = 0.0
        self._sampled_steps: set[int] = set()
        self._last_epoch: int | None = None
        self.parts: Any = None
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
        cache = str(ctx.cache_dir)
        model = ensure_model(_resolve_input(spec.model.uri, ctx.spec_uri), cache)
        model_path = model.path
        self.timings["model_fetch_s"] = model.seconds
        self.model_downloaded = model.downloaded  # False: node-local cache hit (or a local path)
        vae_path = fetch_model(_resolve_input(spec.model.vae, ctx.spec_uri), cache) if spec.model.vae else None
        weights_path = (fetch_model(_resolve_input(spec.network.weights, ctx.spec_uri), cache)
                        if spec.network.weights else None)
        data_sources: dict = {}
        reg_sources: dict = {}
        data_root = fetch_dataset(_resolve_input(spec.dataset.uri, ctx.spec_uri), str(ctx.work_dir / "dataset"),
                                  sources=data_sources)
        reg_root = (fetch_dataset(_resolve_input(spec.dataset.reg_uri, ctx.spec_uri), str(ctx.work_dir / "reg"),
                                  sources=reg_sources)
                    if spec.dataset.reg_uri else None)
        self.timings["fetch_s"] = time.monotonic() - t0
        self._record_provenance(model_path, data_root, data_sources, reg_root, reg_sources)
        return {"model": model_path, "vae": vae_path, "weights": weights_path, "data": data_root, "reg": reg_root}

    def _record_provenance(self, model_path: str, data_root: str, data_sources: dict, reg_root: str | None,
                           reg_sources: dict) -> None:
        """The base model's sha256 and the dataset manifest (trainer/job/provenance.py), for metadata.json."""
        from trainer.job.provenance import MANIFEST_NAME, base_model_sha256, dataset_entry, manifest_bytes

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
        store = open_store(parent if "://" in uri else _resolve_input(parent, self.ctx.spec_uri))
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
        log.info("loading the model")  # torch and the diffusion stack are imported first: the slow part of a start
        import torch

        from trainer.data.dataset import TrainDataset
        from trainer.core.dataset.layout import discover_layout
        from trainer.models.load import load_model
        from trainer.models.network import build_network
        from trainer.core.spec import train_text_encoder, train_unet
        from trainer.train.loop import LoopHooks, make_accelerator, run_training, seed_everything

        spec, ctx = self.spec, self.ctx
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
        device = accelerator.device
        parts = load_model(model_spec, weight_dtype=weight_dtype, vae_dtype=vae_dtype, device=device)
        self.parts = parts

        files = _list_files(inputs["data"])
        reg_files = _list_files(inputs["reg"]) if inputs["reg"] else None
        layout = discover_layout(spec, files, reg_files)
        for w in layout.warnings:
            self.reporter.warn(w)
        dataset = TrainDataset(layout, spec, inputs["data"], tokenizers=parts.tokenizers,
                               max_token_length=spec.dataset.max_token_length or 75, reg_root=inputs["reg"])
        for problem in getattr(dataset, "problems", []):
            self.reporter.warn(str(problem))
        network_spec = spec.network if not inputs["weights"] else msgspec.structs.replace(spec.network, weights=inputs["weights"])
        # The adapter's initial weights follow the job's seed (as in sd-scripts), the same on every rank:
        # unseeded, torch starts each process from a random seed and no two runs begin alike.
        seed_everything(_seed(spec, ctx.job.root_uri))
        network = build_network(network_spec, parts, train_unet=train_unet(spec), train_text_encoder=train_text_encoder(spec))
        self.network = network
        self.timings["load_s"] = time.monotonic() - t0

        resume_dir = None
        step = self.checkpoints.latest()
        if step is not None:
            resume_dir = str(ctx.work_dir / f"resume-{step}")
            self.checkpoints.download(step, resume_dir)
            ledger = Path(resume_dir) / PUBLISHED_LEDGER
            if ledger.exists():
                for item in msgspec.json.decode(ledger.read_bytes(), type=list[OutputFile]):
                    ctx.published[item.name] = item
            log.info("resuming from checkpoint at step %d", step)
            self.reporter.warn(f"attempt {ctx.attempt} resumed from the checkpoint at step {step}")

        every = spec.save.checkpoint_every_n_steps
        hooks = LoopHooks(
            on_step=self._on_step,
            should_stop=self._should_stop,
            on_save=self._on_save,
            checkpoint_due=lambda s: bool(self._should_stop()) or bool(every and s % every == 0),
            on_checkpoint=self._on_checkpoint,
            warn=self.reporter.warn,
        )
        self.reporter.set_phase("training")
        if spec.sample.at_first and resume_dir is None:
            self._sample(0)
        t1 = time.monotonic()
        result = run_training(spec, parts, network, dataset, out_dir=str(self.out_dir), work_dir=str(ctx.work_dir),
                              hooks=hooks, resume_from=resume_dir, seed=_seed(spec, ctx.job.root_uri),
                              accelerator=accelerator)
        self.timings["train_s"] = time.monotonic() - t1
        if "compile_s" in result.timings:
            self.timings["compile_s"] = result.timings["compile_s"]
        if spec.sample.prompts and not result.stopped and result.steps_done not in self._sampled_steps:
            self._sample(result.steps_done)  # sd-scripts also samples at the end of training
        if result.stopped:
            reason = Reason.CANCELLED if result.stopped == "cancelled" else Reason.PREEMPTED
            raise JobFailure(reason, f"stopped at step {result.steps_done} ({result.stopped}); checkpoint saved")
        return result, inputs

    def shrink(self, result: Any, inputs: dict[str, Any]) -> tuple[list[LocalOutput], dict | None]:
        sh = self.spec.shrink
        if not sh.enabled:
            return [], None
        if self.spec.network.algo in UNSHRINKABLE_ALGOS:  # warned about at submit (spec check)
            return [], {"skipped": True, "error": f"'{self.spec.network.algo}' adapters cannot be shrunk"}
        from trainer.shrink import shrink_file

        self.reporter.set_phase("shrinking")
        t0 = time.monotonic()
        name = self.spec.save.output_name
        out_path = str(self.out_dir / f"{name}-shrunk.safetensors")
        plot_path = str(self.out_dir / f"{name}-shrink.png") if sh.plot else None
        uses_base = sh.rank is None and sh.method is None
        try:
            report = shrink_file(result.final_path, out_path, base=inputs["model"] if uses_base else None,
                                 rank=sh.rank, method=sh.method, param=sh.param,
                                 recipe=None if not uses_base else sh.recipe, max_rank=sh.max_rank,
                                 save_precision=sh.save_precision or self.spec.save.save_precision,
                                 device="cuda" if _cuda() else "cpu", plot_path=plot_path,
                                 report_names={"input": f"{name}.safetensors", "output": os.path.basename(out_path),
                                               "base": self.spec.model.uri if uses_base else None})
        except Exception as exc:  # noqa: BLE001 — shrinking is optional: never lose the trained adapter to it
            self.timings["shrink_s"] = time.monotonic() - t0
            message = f"shrink skipped, the full adapter is published: {type(exc).__name__}: {exc}"
            log.warning(message)
            self.reporter.warn(message)
            return [], {"skipped": True, "error": f"{type(exc).__name__}: {exc}"}
        self.timings["shrink_s"] = time.monotonic() - t0
        items = [LocalOutput(out_path, os.path.basename(out_path), "adapter_shrunk")]
        if plot_path and os.path.exists(plot_path):
            items.append(LocalOutput(plot_path, os.path.basename(plot_path), "plot"))
        return items, msgspec.to_builtins(report)

    def publish(self, result: Any, shrink_items: list[LocalOutput], shrink_report: dict | None,
                inputs: dict[str, Any]) -> list[OutputFile]:
        self.reporter.set_phase("uploading")
        t0 = time.monotonic()
        spec, ctx = self.spec, self.ctx
        name = spec.save.output_name
        items = [LocalOutput(result.final_path, f"{name}.safetensors", "adapter"), *shrink_items]
        for item in items:
            if item.kind.startswith("adapter"):
                self._check_zeros(item.path, item.name)
        config_path = self.out_dir / "spec.json"
        config_path.write_bytes(encode_spec(spec))
        items.append(LocalOutput(str(config_path), "spec.json", "config"))
        if self.manifest_path is not None:
            items.append(LocalOutput(str(self.manifest_path), self.manifest_path.name, "manifest"))
        for item in items:
            ctx.published[item.name] = self.publisher.upload(item)
        # sd-scripts' keep-last-N across all attempts' intermediate saves.
        stale = files_to_remove(list(ctx.published), name, keep_epochs=spec.save.save_last_n_epochs,
                                keep_steps=spec.save.save_last_n_steps)
        for old in stale:
            with_retries(lambda o=old: ctx.out.delete(o), what=f"removing old save {old}")
            ctx.published.pop(old, None)
        if spec.sample.grid is not None:
            from trainer.job.grid_job import render_own_grid

            for item in render_own_grid(self):
                ctx.published[item.name] = self.publisher.upload(item)
        self.timings["publish_s"] = time.monotonic() - t0
        metadata = self._metadata(result, shrink_report, inputs)
        outputs = sorted(ctx.published.values(), key=lambda o: o.name)
        return [*outputs, self.publisher.commit(metadata, outputs)]

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
                                 base_seed=_seed(spec, ctx.job.root_uri))
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
        self._check_zeros(path, item.name)
        self.ctx.published[item.name] = self.publisher.upload(item)

    def _check_zeros(self, path: str, name: str) -> None:
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

    # -- metadata ----------------------------------------------------------------------------
    def _metadata(self, result: Any, shrink_report: dict | None, inputs: dict[str, Any]) -> dict[str, Any]:
        from trainer.models.adapter_file import read_metadata

        spec = self.spec
        header = read_metadata(result.final_path)
        return {
            "lathe_version": __version__,
            "git_commit": _git_commit(),
            "job": self.ctx.job.root_uri,
            "attempt": self.ctx.attempt,
            "spec": msgspec.to_builtins(spec),
            "spec_sha256": spec_hash(spec),
            "seed": _seed(spec, self.ctx.job.root_uri),
            "base_model_sha256": self.base_model_sha256,
            "dataset_manifest_sha256": self.manifest_sha256,
            "steps": result.steps_done,
            "epochs": result.epochs_done,
            "loss": {"final_avg": result.avg_loss, "history_len": len(result.loss_history),
                     "first": result.loss_history[:1], "last": result.loss_history[-1:]},
            "header": header,
            "shrink_report": shrink_report,
            "zero_tensors": self.zero_checks,
            "timings_s": self.timings,
            "model_cache": "download" if self.model_downloaded else "hit",
            "packages": _package_versions(),
            "platform": {"python": platform.python_version(), "machine": platform.machine()},
            "warnings": self.reporter.status.warnings,
        }


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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _list_files(root: str) -> list[str]:
    base = Path(root)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def _git_commit() -> str | None:
    env = os.environ.get("LATHE_GIT_COMMIT")
    if env:
        return env
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "lycoris-lora", "safetensors", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_job(spec_uri: str, *, work_dir: str | None = None, cache_dir: str | None = None) -> int:
    """One attempt; returns the exit code for its outcome (trainer/core/failures.py's table)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    attempt = int(os.environ.get("LATHE_JOB_ATTEMPT", "1"))
    work = Path(work_dir or os.environ.get("LATHE_WORK_DIR") or tempfile.mkdtemp(prefix="lathe-job-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir or os.environ.get("LATHE_CACHE_DIR") or Path.home() / ".cache" / "lathe")
    cache.mkdir(parents=True, exist_ok=True)
    log_path = _setup_logging(work, debug=False, rank=rank)
    job_store = open_store(_job_dir_uri(spec_uri))
    reporter = StatusReporter(job_store, attempt=attempt, enabled=rank == 0, log_path=str(log_path),
                              tensorboard_dir=str(work / "logs" / "tensorboard"))
    ctx = RunContext(spec_uri=spec_uri, job=job_store, out=job_store.child("output/"), work_dir=work,
                     cache_dir=cache, attempt=attempt, rank=rank, world_size=world)

    def on_sigterm(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: checkpointing at the next step boundary, then exiting")
        ctx.stop_signal = "preempted"

    signal.signal(signal.SIGTERM, on_sigterm)
    job: Job | None = None
    spec: JobSpec | None = None
    try:
        reporter.start()
        spec = _read_spec(spec_uri)
        if spec.save.output_uri:
            ctx.out = open_store(spec.save.output_uri)
        if spec.logging.debug:
            logging.getLogger().setLevel(logging.DEBUG)
        for w in warnings_for(spec):
            reporter.warn(f"{w.path}: {w.message}")
        job = Job(ctx, spec, reporter)
        log.info("job %s attempt %d (rank %d/%d)", job_store.root_uri, attempt, rank, world)
        if spec.kind != "train":
            from trainer.job.caption_job import run_caption
            from trainer.job.grid_job import run_grid
            from trainer.job.merge_job import run_merge
            from trainer.job.shrink_job import run_shrink

            run_kind = {"merge": run_merge, "shrink": run_shrink, "caption": run_caption, "grid": run_grid}[spec.kind]
            reporter.set_outputs(run_kind(job, lambda uri: _resolve_input(uri, spec_uri)))
            reporter.finish("succeeded")
            log.info("job succeeded")
            return 0
        inputs = job.prepare()
        if ctx.stop_signal or reporter.cancel_requested:
            raise JobFailure(Reason.CANCELLED if reporter.cancel_requested else Reason.PREEMPTED,
                             "stopped before training started")
        result, inputs = job.train(inputs)
        if ctx.is_main:
            shrink_items, shrink_report = job.shrink(result, inputs)
            outputs = job.publish(result, shrink_items, shrink_report, inputs)
            reporter.set_outputs(outputs)
        log.info("job succeeded")  # before finish(), which uploads the log
        reporter.finish("succeeded")
        return SUCCESS_EXIT
    except JobFailure as failure:
        return _fail(reporter, job, spec, failure)
    except StorageError as exc:
        return _fail(reporter, job, spec, JobFailure(Reason.STORAGE_ERROR, str(exc)))
    except MemoryError:
        return _fail(reporter, job, spec, JobFailure(Reason.INTERNAL, "out of host memory"))
    except Exception as exc:  # noqa: BLE001 — every failure gets a reason; the traceback goes to the log only
        log.error("internal error:\n%s", traceback.format_exc())
        if _is_cuda_oom(exc):
            return _fail(reporter, job, spec, JobFailure(Reason.INTERNAL, "CUDA out of memory: lower the batch size, "
                                                         "enable gradient checkpointing or cache latents"))
        return _fail(reporter, job, spec, JobFailure(Reason.INTERNAL, f"{type(exc).__name__}: {exc}"))


def _is_cuda_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def _fail(reporter: StatusReporter, job: Job | None, spec: JobSpec | None, failure: JobFailure) -> int:
    log.error("job failed: %s", failure)
    final = failure.reason not in (Reason.PREEMPTED, Reason.STORAGE_ERROR, Reason.INTERNAL)
    if job is not None and final and not (spec and spec.save.keep_failed_outputs):
        job.publisher.remove_partial()
    try:
        reporter.finish("cancelled" if failure.reason == Reason.CANCELLED else "failed",
                        reason=failure.reason.value, message=failure.message)
    except JobFailure as exc:  # the store stayed unreachable: the exit code still tells the launcher
        log.error("could not write the final status: %s", exc)
    return failure.exit_code


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer run", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="spec.json / spec.toml: a local path or s3://bucket/…/jobs/<id>/spec.json")
    parser.add_argument("--work-dir", help="local scratch folder (default: LATHE_WORK_DIR or a temp folder)")
    parser.add_argument("--cache-dir", help="node-local model cache (default: LATHE_CACHE_DIR or ~/.cache/lathe)")
    args = parser.parse_args(argv)
    code = run_job(args.spec, work_dir=args.work_dir, cache_dir=args.cache_dir)
    from trainer.job.launch import record_exit

    record_exit(code)
    return code
