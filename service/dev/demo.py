"""`make demo` (`python -m service.dev.demo`): one real job through the whole stack, on this machine.

Starts the embedded stack of `lathe dev` (service/dev/stack.py: a local S3 server, the API, the local
launcher, a tiny SD1.5 model and dataset), submits a short LoCon job through the HTTP API, follows it
on the SSE stream, pulls the results (sha256-checked) into `<workdir>/results/<job id>/`, prints the
metadata summary and the shrink report, stops everything and ends with the job's final phase. Exit
status 0 only when the job succeeded (1 when it did not, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from trainer.core.jobkeys import METADATA_NAME
from service.cli_output import TERMINAL, bar, duration

DEFAULT_WORKDIR = ".lathe/demo"
SAMPLE_PROMPT = "a photo of a red square --n blurry --w 64 --h 64 --s 4 --l 5 --d 1"


def _say(message: str = "") -> None:
    print(message, flush=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _quiet_logging() -> None:
    """Library chatter (moto's request log, botocore, httpx, uvicorn) would bury the demo's output."""
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("werkzeug", "moto", "botocore", "boto3", "urllib3", "httpx", "httpcore", "uvicorn",
                 "uvicorn.error", "uvicorn.access", "litestar"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The service's own INFO lines (jobs launched, ended) say what the phase lines below say already.
    logging.getLogger("lathe").setLevel(logging.WARNING)


def demo_spec(stack: Any, steps: int) -> dict[str, Any]:
    """The dev stack's example spec, kept small: a few steps, one 64 px sample at the end, shrink to rank 2."""
    spec = stack.example_spec()
    spec["name"] = "lathe-demo"
    spec["training"].update({"max_train_steps": steps, "batch_size": 2, "seed": 0})
    spec["save"] = {"output_name": "lathe-demo"}
    spec["sample"] = {"prompts": [SAMPLE_PROMPT], "sampler": "euler", "every_n_steps": steps}
    spec["shrink"] = {"enabled": True, "rank": 2, "plot": False}
    spec["resources"] = {"gpus": 0, "max_attempts": 1}
    return spec


# ------------------------------------------------------------------------------------- progress


def _progress_line(phase: str, progress: dict[str, Any]) -> str:
    line = f"  {phase:<10} {bar(progress)}"
    if progress.get("it_per_s"):
        line += f"  {progress['it_per_s']:.2f} it/s"
    return line


def follow(client: Any, job_id: str, started: float) -> str:
    """Phase changes and progress from the SSE stream until the terminal event; returns that phase.

    Progress is training progress, and the status keeps it through the later phases. A short
    training can end between two status writes, so its last steps may first appear with the next
    phase; they are shown before that phase is announced."""
    tty = sys.stdout.isatty()
    phase, width, shown_step = "", 0, None

    def show_progress(progress: dict[str, Any]) -> None:
        nonlocal width
        line = _progress_line("training", progress)
        if tty:
            print("\r" + line.ljust(width), end="", flush=True)
            width = len(line)
        else:
            _say(line)

    for _, kind, event in client.events(job_id):
        progress = event.get("progress") or {}
        step = progress.get("step") if progress.get("total_steps") else None
        advanced = step is not None and step != shown_step
        if advanced:
            shown_step = step
        if advanced and event["phase"] != "training":  # steps that ended between two status writes
            show_progress(progress)
        if event["phase"] != phase:
            if tty and width:
                print()
            phase, width = event["phase"], 0
            _say(f"  {time.monotonic() - started:6.1f}s  phase -> {phase}")
        if advanced and event["phase"] == "training":
            show_progress(progress)
        if phase in TERMINAL:
            break
    if tty and width:
        print()
    return phase


# -------------------------------------------------------------------------------------- reports


def print_files(job: dict[str, Any], root: Path) -> None:
    _say(f"results in {root}:")
    by_name = {o["name"]: o for o in job.get("outputs") or []}
    for name, out in sorted(by_name.items()):
        path = root / name
        have = path.stat().st_size if path.exists() else None
        _say(f"  {name:<36} {_size(out['size']):>10}  {out['kind']:<15} sha256 {out['sha256'][:12]}"
             + ("" if have == out["size"] else "  (missing)"))


def print_metadata(meta: dict[str, Any]) -> None:
    spec, loss = meta.get("spec") or {}, meta.get("loss") or {}
    model, net = spec.get("model") or {}, spec.get("network") or {}
    header = meta.get("header") or {}
    _say("metadata summary (metadata.json):")
    _say(f"  base model   {model.get('uri')} (arch {model.get('arch')})"
         + (f", sshs_model_hash {header['sshs_model_hash'][:12]}" if header.get("sshs_model_hash") else ""))
    network = f"{net.get('algo', 'lora')} dim {net.get('dim')} alpha {net.get('alpha')}"
    if net.get("conv_dim"):
        network += f", conv dim {net.get('conv_dim')} alpha {net.get('conv_alpha')}"
    _say(f"  network      {network}")
    _say(f"  steps        {meta.get('steps')} in {meta.get('epochs')} epoch(s), seed {meta.get('seed')}, "
         f"attempt {meta.get('attempt')}")
    first, last = (loss.get("first") or [None])[0], (loss.get("last") or [None])[-1]
    parts = [f"final avg {loss['final_avg']:.4f}" if loss.get("final_avg") is not None else "final avg n/a"]
    if first is not None and last is not None:
        parts.append(f"first step {first:.4f}, last step {last:.4f}")
    _say(f"  loss         {', '.join(parts)}")
    timings = meta.get("timings_s") or {}
    if timings:
        _say("  timings      " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timings.items()))
    packages = meta.get("packages") or {}
    if packages:
        _say("  packages     " + ", ".join(f"{k} {v}" for k, v in sorted(packages.items())))
    _say(f"  lathe        {meta.get('lathe_version')}" + (f" ({meta['git_commit'][:12]})" if meta.get("git_commit") else ""))
    for w in meta.get("warnings") or []:
        _say(f"  warning      {w}")


def print_shrink(report: dict[str, Any] | None) -> None:
    if not report:
        _say("shrink report: none (shrink disabled)")
        return
    if report.get("skipped") or "totals" not in report:
        _say(f"shrink report: skipped ({report.get('error', 'no details')}); the full adapter is published")
        return
    t = report["totals"]
    rule = {"rank": f"rank {report.get('rank')}", "method": f"{report.get('method')} {report.get('param')}",
            "recipe": f"recipe {report.get('recipe')}"}.get(report.get("rule"), report.get("rule"))
    before = sorted({row["old_rank"] for row in report["layers"]})
    after = [row["new_rank"] for row in report["layers"] if row["new_rank"]]
    _say(f"shrink report ({rule}, saved as {report.get('save_precision')} on {report.get('device')}):")
    _say(f"  layers       {t['layers_out']}/{t['layers_in']} kept, {t['layers_omitted']} omitted, "
         f"{t['passthrough_keys']} passed through")
    _say(f"  ranks        before {_ranks(before)} -> after {_ranks(after)}"
         + (f" (mean {sum(after) / len(after):.1f})" if after else ""))
    _say(f"  size         {_size(t['bytes_in'])} -> {_size(t['bytes_out'])} "
         f"({t['params_in']:,} -> {t['params_out']:,} parameters)")
    _say(f"  error        relative {t['rel_error']:.4f} (worst layer {t['max_rel_error']:.4f}), "
         f"retained Frobenius {t['retained_fro']:.4f}")
    worst = sorted(report["layers"], key=lambda r: r["rel_error"], reverse=True)[:3]
    _say("  worst layers " + "\n               ".join(
        f"error {row['rel_error']:.4f}  rank {row['old_rank']}->{row['new_rank']}  {row['name']}" for row in worst))


def _ranks(values: Any) -> str:
    values = list(values)
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}..{hi}"


def print_failure(client: Any, job: dict[str, Any]) -> None:
    err = job.get("error") or {}
    _say(f"job {job['id']} did not succeed: phase {job['phase']}")
    if err:
        _say(f"  error {err.get('reason')}: {err.get('message')}")
    try:
        tail = client.logs(job["id"], 40)
    except Exception as exc:  # noqa: BLE001 — the failure is what matters; the log is a bonus
        tail = f"(could not read the trainer log: {exc})"
    _say("trainer log (last 40 lines):")
    for line in tail.splitlines():
        _say(f"  | {line}")


# ----------------------------------------------------------------------------------------- main


def run(workdir: Path, steps: int, timeout_s: float) -> tuple[str, str | None]:
    """The demo proper; returns (final phase, job id). The stack is stopped whatever happens."""
    from service.client import ApiError, Client
    from service.dev.stack import DevStack

    started = time.monotonic()
    _say(f"[1/5] starting the embedded stack in {workdir} (local S3 + API + local launcher, 127.0.0.1)")
    stack = DevStack(workdir, api_port=0)
    job_id: str | None = None
    phase = "not submitted"
    try:
        stack.start()
        _quiet_logging()  # the app's logging setup (litestar) reset the root logger
        _say(f"  API {stack.url}  S3 {stack.s3_endpoint}  ({time.monotonic() - started:.1f}s, "
             f"tiny model {stack.model_uri}, dataset {stack.dataset_uri})")
        with Client(stack.url, stack.token, timeout_s=60) as client:
            spec = demo_spec(stack, steps)
            (stack.workdir / "demo-spec.json").write_text(json.dumps(spec, indent=2))
            _say(f"[2/5] POST {stack.url}/v1/jobs  ({spec['network']['algo']} dim {spec['network']['dim']}, "
                 f"{steps} steps, batch {spec['training']['batch_size']}, shrink to rank {spec['shrink']['rank']}, "
                 f"1 sample; spec in {stack.workdir / 'demo-spec.json'})")
            try:
                job = client.submit(spec)
            except ApiError as exc:
                _say(exc.explain())
                return "rejected", None
            job_id = job["id"]
            pre = job.get("preflight") or {}
            _say(f"  job {job_id}: {pre.get('images', '?')} images, {pre.get('total_steps', '?')} steps "
                 f"in {pre.get('epochs', '?')} epoch(s)")
            _say(f"[3/5] following GET /v1/jobs/{job_id}/events")
            phase = follow(client, job_id, started)
            job = _wait_recorded(client, job_id, deadline=time.monotonic() + timeout_s)
            phase = job["phase"]
            if phase != "succeeded":
                print_failure(client, job)
                return phase, job_id
            dest = stack.workdir / "results" / job_id
            _say(f"[4/5] pulling {len(job['outputs'])} files (presigned URLs, sha256 checked)")
            client.pull(job_id, str(dest))
            print_files(job, dest)
            _say(f"[5/5] what the job produced  (total {duration(time.monotonic() - started)})")
            meta_path = dest / METADATA_NAME
            if meta_path.exists():
                meta = json.loads(meta_path.read_text())
                print_metadata(meta)
                print_shrink(meta.get("shrink_report"))
            else:
                _say("  metadata.json was not among the outputs")
                phase = "succeeded (no metadata.json)"
        return phase, job_id
    finally:
        _say("stopping the stack ...")
        stack.stop()
        _say(f"stopped ({time.monotonic() - started:.1f}s in all)")


def _wait_recorded(client: Any, job_id: str, deadline: float) -> dict[str, Any]:
    """The job once the service recorded its end (the trainer process has exited): stopping the
    stack then leaves nothing half-written."""
    job = client.get(job_id)
    while not job.get("finished_at") and time.monotonic() < deadline:
        time.sleep(0.25)
        job = client.get(job_id)
    return job


def _sigterm(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.dev.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.environ.get("LATHE_DEMO_DIR", DEFAULT_WORKDIR),
                        help=f"working folder: seeds, trainer runs, results (default: LATHE_DEMO_DIR or {DEFAULT_WORKDIR})")
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the service to record the job's end after its last event")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_logging()
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        phase, job_id = run(Path(args.workdir), args.steps, args.timeout)
    except KeyboardInterrupt:
        _say("lathe demo: interrupted; the stack is stopped")
        return 130
    except Exception as exc:  # noqa: BLE001 — the traceback for whoever debugs it, then the readable end
        traceback.print_exc()
        _say(f"lathe demo: error: {type(exc).__name__}: {exc}")
        _say("lathe demo: final phase: not reached (the demo itself failed)")
        return 1
    _say(f"lathe demo: job {job_id or '-'} final phase: {phase}")
    return 0 if phase == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
