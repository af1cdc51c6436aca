"""`python -m trainer run SPEC_URI`: one attempt of a job, end to end.

Phases: preparing (fetch model + dataset, build caches) → training → shrinking → uploading →
succeeded, or failed with a machine-readable reason and the matching exit code (trainer/core/failures.py).
The folder holding the spec is the job directory (`JobDir`): status.json, cancel, checkpoints/ and logs/
live there. Resumes from the newest valid checkpoint, so a preempted or killed attempt loses at most the
steps since. The train kind's phases are in train_job.py and train_outputs.py, the other kinds' in
merge_job.py, shrink_job.py, grid_job.py and caption_job.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from trainer.core.failures import SUCCESS_EXIT, JobFailure, Reason
from trainer.core.settings import trainer_settings
from trainer.core.jobdir import JobDir, StatusReporter
from trainer.core.spec import JobSpec, warnings_for
from trainer.core.status import OutputFile
from trainer.core.storage import StorageError, open_store
from trainer.job.context import RunContext
from trainer.job.train_job import Job

log = logging.getLogger("lathe.run")


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


def _context(spec_uri: str, work_dir: str | None, cache_dir: str | None) -> tuple[RunContext, Path]:
    """This attempt's context from the arguments and the launcher's environment (rank, attempt, folders),
    and the local log file."""
    settings = trainer_settings()
    work = Path(work_dir or settings.work_dir or tempfile.mkdtemp(prefix="lathe-job-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else settings.model_cache()
    cache.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate, not a Lathe setting
    log_path = _setup_logging(work, debug=False, rank=rank)
    jobdir = JobDir.from_spec_uri(spec_uri)
    ctx = RunContext(jobdir=jobdir, out=jobdir.output_store(), work_dir=work, cache_dir=cache,
                     attempt=settings.job_attempt, rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return ctx, log_path


def run_job(spec_uri: str, *, work_dir: str | None = None, cache_dir: str | None = None) -> int:
    """One attempt; returns the exit code for its outcome (trainer/core/failures.py's table)."""
    ctx, log_path = _context(spec_uri, work_dir, cache_dir)
    reporter = StatusReporter(ctx.jobdir.store, attempt=ctx.attempt, enabled=ctx.is_main, log_path=str(log_path),
                              tensorboard_dir=str(ctx.work_dir / "logs" / "tensorboard"))

    def on_sigterm(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: checkpointing at the next step boundary, then exiting")
        ctx.stop_signal = "preempted"

    signal.signal(signal.SIGTERM, on_sigterm)
    job: Job | None = None
    spec: JobSpec | None = None
    try:
        reporter.start()
        spec = ctx.jobdir.read_spec()
        job = _start(ctx, spec, reporter)
        outputs = _run_phases(job)
        if outputs is not None:
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


def _start(ctx: RunContext, spec: JobSpec, reporter: StatusReporter) -> Job:
    """The spec's settings that shape the attempt (output location, debug logging, warnings)."""
    if spec.save.output_uri:
        ctx.out = open_store(spec.save.output_uri)
    if spec.logging.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    for w in warnings_for(spec):
        reporter.warn(f"{w.path}: {w.message}")
    job = Job(ctx, spec, reporter)
    log.info("job %s attempt %d (rank %d/%d)", ctx.jobdir.uri, ctx.attempt, ctx.rank, ctx.world_size)
    return job


def _run_phases(job: Job) -> list[OutputFile] | None:
    """The spec's kind, phase by phase; the outputs status.json lists (None on a rank that publishes nothing)."""
    from trainer.job import train_outputs

    ctx, reporter = job.ctx, job.reporter
    if job.spec.kind != "train":
        from trainer.job.caption_job import run_caption
        from trainer.job.grid_job import run_grid
        from trainer.job.merge_job import run_merge
        from trainer.job.shrink_job import run_shrink

        run_kind = {"merge": run_merge, "shrink": run_shrink, "caption": run_caption, "grid": run_grid}[job.spec.kind]
        return run_kind(job)
    inputs = job.prepare()
    if ctx.stop_signal or reporter.cancel_requested:
        raise JobFailure(Reason.CANCELLED if reporter.cancel_requested else Reason.PREEMPTED,
                         "stopped before training started")
    result = job.train(inputs)
    if not ctx.is_main:
        return None
    shrink_items, shrink_report = train_outputs.shrink(job, result, inputs)
    return train_outputs.publish(job, result, shrink_items, shrink_report)


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
