"""Load test of the service on loopback: many pollers and a stream of real submits at once.

    OMP_NUM_THREADS=1 .venv/bin/python bench/load.py [--pollers 200] [--seconds 60]
        [--submit-rate 20] [--submit-seconds 30] [--launcher fake|none]

The service runs as deployed (`python -m service.cli serve`, its own process) on a local S3 server
(moto, its own process); the load comes from this process (asyncio + httpx), all on 127.0.0.1:
- `--pollers` clients each GET /v1/jobs/{id} of a random submitted job, then wait `--poll-interval`
  (closed loop; 2 s by default, as `lathe logs -f` polls), for `--seconds`;
- meanwhile, from `--submit-start` on, POST /v1/jobs at `--submit-rate` per second (open loop, one
  Idempotency-Key each) for `--submit-seconds`: the whole submit path, spec checks and the dataset
  preflight included;
- the service's RSS (/proc/<pid>/status) is sampled every second, and the CPU time of the service,
  the S3 server and the load generator is read before and after (one Python process: the service
  can use one core at most).
Submitted jobs do not train: with `--launcher fake` (default) the reconciler launches them through the
LocalLauncher with the stand-in trainer of the service tests (tests/service/fake_trainer.py), at most
`--max-running` at once, so a queue builds up as in production; `--launcher none` leaves them queued
(an API-only replica). Prints a JSON document and a Markdown table; exits 1 on any error response.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import free_port, local_s3, percentile, seed_tiny_job_inputs, stop_process  # noqa: E402

BUCKET = "load"
TENANT, TOKEN = "load", "load-bench-token-0123456789"
FAKE_TRAINER = REPO / "tests" / "service" / "fake_trainer.py"


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stats(latencies: list[float], errors: int, seconds: float) -> dict[str, float]:
    """`seconds`: from the first request sent to the last answer received (the answered rate)."""
    return {"requests": len(latencies) + errors, "errors": errors, "rps": round(len(latencies) / max(seconds, 1e-9), 1),
            "p50_ms": round(1000 * percentile(latencies, 0.50), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
            "max_ms": round(1000 * max(latencies, default=0.0), 1)}


async def run_load(url: str, spec: dict, args: argparse.Namespace, pid: int, s3_pid: int) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=args.pollers + 200, max_keepalive_connections=args.pollers + 200)
    job_ids: list[str] = []
    poll_lat: list[float] = []
    submit_lat: list[float] = []
    errors: dict[str, list[str]] = {"poll": [], "submit": []}
    rss: list[tuple[float, float]] = []
    last_answer = {"poll": 0.0, "submit": 0.0}
    first_submit = [0.0]
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        for i in range(10):  # a few jobs to poll from the first second on
            resp = await client.post("/v1/jobs", json={"spec": spec}, headers={"Idempotency-Key": f"seed-{i}"})
            resp.raise_for_status()
            job_ids.append(resp.json()["id"])
        for _ in range(20):  # warm every code path once
            await client.get(f"/v1/jobs/{job_ids[0]}")
        start = time.monotonic()
        stop = start + args.seconds
        cpu0 = {"service": cpu_s(pid), "s3 server": cpu_s(s3_pid), "load generator": cpu_s(os.getpid())}

        async def poller(n: int) -> None:
            rng = random.Random(n)
            await asyncio.sleep(rng.uniform(0, args.poll_interval))  # spread the first round
            while time.monotonic() < stop:
                job_id = rng.choice(job_ids)
                t0 = time.perf_counter()
                try:
                    resp = await client.get(f"/v1/jobs/{job_id}")
                    if resp.status_code != 200:
                        errors["poll"].append(f"{resp.status_code} {resp.text[:200]}")
                    else:
                        poll_lat.append(time.perf_counter() - t0)
                        last_answer["poll"] = time.monotonic()
                except httpx.HTTPError as exc:
                    errors["poll"].append(repr(exc))
                await asyncio.sleep(args.poll_interval)

        async def submit(i: int) -> None:
            t0 = time.perf_counter()
            try:
                resp = await client.post("/v1/jobs", json={"spec": spec}, headers={"Idempotency-Key": f"load-{i}"})
                if resp.status_code != 201:
                    errors["submit"].append(f"{resp.status_code} {resp.text[:200]}")
                else:
                    submit_lat.append(time.perf_counter() - t0)
                    last_answer["submit"] = time.monotonic()
                    job_ids.append(resp.json()["id"])
            except httpx.HTTPError as exc:
                errors["submit"].append(repr(exc))

        async def submitter() -> None:
            await asyncio.sleep(args.submit_start)
            t_first = first_submit[0] = time.monotonic()
            tasks = []
            total = int(args.submit_rate * args.submit_seconds)
            for i in range(total):  # open loop: on schedule, whatever the latency
                await asyncio.sleep(max(0.0, t_first + i / args.submit_rate - time.monotonic()))
                tasks.append(asyncio.create_task(submit(i)))
            await asyncio.gather(*tasks)

        finished = asyncio.Event()

        async def sampler() -> None:  # until the last answer is in
            while not finished.is_set():
                value = rss_mib(pid)
                if value is not None:
                    rss.append((round(time.monotonic() - start, 1), round(value, 1)))
                try:
                    await asyncio.wait_for(finished.wait(), 1.0)
                except TimeoutError:
                    pass

        async def traffic() -> None:
            await asyncio.gather(submitter(), *(poller(n) for n in range(args.pollers)))
            finished.set()

        await asyncio.gather(sampler(), traffic())
        elapsed = time.monotonic() - start
        cpu1 = {"service": cpu_s(pid), "s3 server": cpu_s(s3_pid), "load generator": cpu_s(os.getpid())}
    rss_values = [v for _, v in rss]
    before = [v for t, v in rss if t < args.submit_start] or rss_values[:1]
    during = [v for t, v in rss if args.submit_start <= t < args.submit_start + args.submit_seconds]
    after = [v for t, v in rss if t >= args.submit_start + args.submit_seconds] or rss_values[-1:]
    return {
        "poll": stats(poll_lat, len(errors["poll"]), last_answer["poll"] - start),
        "submit": stats(submit_lat, len(errors["submit"]), last_answer["submit"] - first_submit[0]),
        "jobs_submitted": len(job_ids),
        "rss_mib": {"first": rss_values[0] if rss_values else None,
                    "max_before_submits": max(before, default=None), "max_during_submits": max(during, default=None),
                    "max_after_submits": max(after, default=None), "last": rss_values[-1] if rss_values else None,
                    "samples_every_5s": rss[::5]},
        "last_answer_after_s": round(max(last_answer.values()) - start, 1),
        "cpu_cores_used": {k: round((cpu1[k] - cpu0[k]) / elapsed, 2) for k in cpu0},
        "error_samples": {k: v[:5] for k, v in errors.items()},
        "elapsed_s": round(elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=2.0,
                        help="seconds a poller waits between GETs (the CLI's polling interval)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the pollers run")
    parser.add_argument("--submit-rate", type=float, default=20.0, help="submits per second")
    parser.add_argument("--submit-seconds", type=float, default=30.0)
    parser.add_argument("--submit-start", type=float, default=15.0, help="seconds into the run the submits begin")
    parser.add_argument("--launcher", choices=["fake", "none"], default="fake")
    parser.add_argument("--max-running", type=int, default=2, help="LATHE_MAX_RUNNING_JOBS with --launcher fake")
    parser.add_argument("--fake-step-s", type=float, default=5.0,
                        help="seconds per step of the stand-in trainer (3 steps): few launches, a long queue")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lathe-load-"))
    with local_s3() as (endpoint, moto):
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        seed_tiny_job_inputs(s3, BUCKET)
        tokens = tmp / "tokens.json"
        tokens.write_text(json.dumps({"tenants": [{
            "name": TENANT, "token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()],
            "model_prefixes": [f"s3://{BUCKET}/models/"], "dataset_prefixes": [f"s3://{BUCKET}/datasets/"],
            "limits": {"max_concurrent_jobs": 10000}}]}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "LATHE_STATE_URI": f"s3://{BUCKET}/state/", "LATHE_TOKENS_FILE": str(tokens),
               "LATHE_LOCAL_DIR": str(tmp / "local"), "LATHE_LOCAL_CACHE_DIR": str(tmp / "cache")}
        if args.launcher == "none":
            env.update({"LATHE_LAUNCHER": "none", "LATHE_RECONCILE_INTERVAL_S": "0"})
            how = "launcher none: an API-only replica, submitted jobs stay queued"
        else:
            env.update({"LATHE_LAUNCHER": "local", "LATHE_MAX_RUNNING_JOBS": str(args.max_running),
                        "LATHE_TRAINER_COMMAND": json.dumps([sys.executable, str(FAKE_TRAINER)]),
                        "FAKE_STEP_S": str(args.fake_step_s)})
            how = (f"LocalLauncher + reconciler running the stand-in trainer (tests/service/fake_trainer.py, "
                   f"3 steps of {args.fake_step_s:g} s), at most {args.max_running} at once: the rest queue")
        log_path = tmp / "serve.log"
        with open(log_path, "wb") as log:
            service = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                                       cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if service.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the service did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            spec = {"version": 1, "model": {"uri": f"s3://{BUCKET}/models/tiny"},
                    "dataset": {"uri": f"s3://{BUCKET}/datasets/tiny", "caption_extension": ".txt"},
                    "training": {"max_train_steps": 3}, "resources": {"gpus": 0}}
            result = asyncio.run(run_load(url, spec, args, service.pid, moto.pid))
            metrics = httpx.get(url + "/metrics", timeout=120).text
            values: dict[str, float] = {}
            server_errors = 0.0
            for line in metrics.splitlines():
                if line.startswith("lathe_reconcile_duration_seconds_") and " " in line:
                    name, value = line.rsplit(" ", 1)
                    values[name] = float(value)
                if line.startswith("lathe_http_requests_total{") and 'status="5' in line:
                    server_errors += float(line.rsplit(" ", 1)[1])
            passes = values.get("lathe_reconcile_duration_seconds_count", 0.0)
            reconciler = {"passes": int(passes), "mean_pass_s": round(
                values.get("lathe_reconcile_duration_seconds_sum", 0.0) / passes, 2) if passes else None}
            # Every answered submit is a real job: count the index markers the service wrote (straight
            # from the store: listing 600 jobs through the API would load the service further).
            created = sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=f"state/tenants/{TENANT}/index/"))
        finally:
            stop_process(service, 30)
            for pid_file in (tmp / "local").glob("*/*/pid"):  # this run's stand-in trainers, by process group
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGTERM)
                except (ValueError, ProcessLookupError, PermissionError):
                    pass
    result = {"pollers": args.pollers, "poll_interval_s": args.poll_interval, "seconds": args.seconds,
              "submit_rate": args.submit_rate, "submit_seconds": args.submit_seconds, "launcher": how,
              **result, "jobs_created": created, "service_5xx": int(server_errors), "reconciler": reconciler,
              "cpus": os.cpu_count(),
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result, indent=2))
    p, s, m = result["poll"], result["submit"], result["rss_mib"]
    print()
    print(f"Jobs: {how}; {created} jobs created (10 before the run, the rest by the submits).")
    print()
    print("| traffic (offered) | requests | errors | answered/s | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| GET /v1/jobs/{{id}} ({args.pollers} pollers, {args.seconds:.0f} s) | {p['requests']} | {p['errors']} | "
          f"{p['rps']} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} |")
    print(f"| POST /v1/jobs ({args.submit_rate:g}/s for {args.submit_seconds:.0f} s) | {s['requests']} | {s['errors']} | "
          f"{s['rps']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} |")
    print()
    print(f"Service RSS (MiB): first {m['first']}, max before submits {m['max_before_submits']}, during "
          f"{m['max_during_submits']}, after {m['max_after_submits']}, last {m['last']}")
    print(f"The last answer came {result['last_answer_after_s']} s after the pollers started "
          f"(they stop sending at {args.seconds:g} s).")
    print(f"Answers with a 5xx status counted by the service: {result['service_5xx']}; reconciler passes: "
          f"{reconciler['passes']}, mean {reconciler['mean_pass_s']} s")
    print("CPU cores used over the run: " + ", ".join(f"{k} {v}" for k, v in result["cpu_cores_used"].items())
          + f" (of {os.cpu_count()}; load average at the end {result['loadavg_at_end'][0]})")
    return 0 if p["errors"] == 0 and s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
