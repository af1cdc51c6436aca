"""API benchmark: throughput and latency of the service on loopback, against a local S3 server.

    OMP_NUM_THREADS=1 .venv/bin/python bench/api.py [--seconds 10] [--clients 32] [--big 10000]
    OMP_NUM_THREADS=1 .venv/bin/python bench/api.py --baseline ../base --rounds 4 --seconds 5 --big 2000

Measures, in one run:
- GET /v1/jobs/{id} and POST /v1/jobs:validate with `--clients` concurrent clients (requests/s,
  p50, p99);
- a bare S3 GET of the same job's status.json with the same concurrency (boto3), the floor the
  service's own overhead is reported against;
- GET /v1/jobs page latency (limit 20) for a tenant with 100 and one with `--big` stored jobs.
The service runs as `python -m service.cli serve` (its own process, as deployed), the S3 server as
moto's standalone server; both on 127.0.0.1. Each row also reports the service's CPU milliseconds per
request (from /proc), steadier than latency on a shared host.

With `--baseline TREE` (a checkout of another revision) that revision's service runs beside this
one on the same seeded state, every row is measured against both, alternating, `--rounds` times, and
the table gives the paired ratios. Prints a JSON document and Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import seed_tiny_job_inputs  # noqa: E402
from service.state.jobstore import JobRecord, JobStore, index_name, new_job_id  # noqa: E402
from trainer.core.status import JobStatus, Progress  # noqa: E402
from trainer.core.storage import open_store  # noqa: E402

BUCKET = "bench"
TOKENS = {"small": "bench-small-token", "big": "bench-big-token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies: list[float], elapsed: float, errors: int) -> dict[str, float]:
    return {"requests": len(latencies), "errors": errors, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.50), 2), "p99_ms": round(1000 * percentile(latencies, 0.99), 2)}


async def http_load(url: str, method: str, seconds: float, clients: int, headers: dict[str, str],
                    body: dict | None = None) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        await client.request(method, url, json=body)  # warm-up
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                resp = await client.request(method, url, json=body)
                dt = time.perf_counter() - t0
                if resp.status_code >= 400:
                    errors += 1
                else:
                    latencies.append(dt)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.monotonic() - start
    return summary(latencies, elapsed, errors)


def s3_load(endpoint: str, key: str, seconds: float, clients: int) -> dict[str, float]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      config=__import__("botocore.config").config.Config(max_pool_connections=clients))
    s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        local = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        for _ in pool.map(lambda _: worker(), range(clients)):
            pass
    return summary(latencies, time.monotonic() - start, 0)


def seed_jobs(store: JobStore, tenant: str, count: int, workers: int = 32) -> None:
    """Finished jobs written straight to the store (job.json + index marker + status.json), as the
    API and trainer would leave them; no preflight, so 10,000 take a minute rather than an hour."""
    now = time.time()

    def one(i: int) -> None:
        submitted = now - count + i
        job_id = new_job_id(submitted)
        record = JobRecord(job_id=job_id, tenant=tenant, submitted_at=submitted, spec_hash="0" * 64,
                           state="finished", attempt=1, final_phase="succeeded", finished_at=submitted + 1)
        job = store.job_dir(tenant, job_id)
        job.put_json("job.json", record)
        job.put_json("status.json", JobStatus(phase="succeeded", revision=9, attempt=1, heartbeat_at=submitted,
                                              progress=Progress(step=10, total_steps=10)))
        store.tenant(tenant).put_bytes(f"index/{index_name(submitted, job_id)}", b"")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))


def page_latency(url: str, token: str, pages: int) -> dict[str, float]:
    latencies = []
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        client.get(f"{url}/v1/jobs", params={"limit": 20})
        cursor = None
        for _ in range(pages):
            t0 = time.perf_counter()
            resp = client.get(f"{url}/v1/jobs", params={"limit": 20, **({"cursor": cursor} if cursor else {})})
            latencies.append(time.perf_counter() - t0)
            resp.raise_for_status()
            cursor = resp.json()["next_cursor"]  # None at the end: the next request reads the first page again
    return {"pages": pages, "p50_ms": round(1000 * percentile(latencies, 0.5), 2),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2)}


def start_service(tree: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`lathe serve` from the checkout at `tree` (this one, or a baseline's) on `port`."""
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=tree,
                            env={**env, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc


def cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_rows(url: str, job_id: str, args: argparse.Namespace) -> dict[str, Callable[[], dict[str, float]]]:
    """Each measured row as a call against the service at `url`."""
    small_headers = {"Authorization": f"Bearer {TOKENS['small']}"}
    spec = {"version": 1, "model": {"uri": f"s3://{BUCKET}/models/tiny"},
            "dataset": {"uri": f"s3://{BUCKET}/datasets/tiny", "caption_extension": ".txt"},
            "training": {"max_train_steps": 100}, "resources": {"gpus": 1}}
    return {
        "get_job": lambda: asyncio.run(http_load(f"{url}/v1/jobs/{job_id}", "GET", args.seconds, args.clients,
                                                 small_headers)),
        "validate": lambda: asyncio.run(http_load(f"{url}/v1/jobs:validate", "POST", args.seconds, args.clients,
                                                  small_headers, {"spec": spec})),
        "list_page_small": lambda: page_latency(url, TOKENS["small"], args.pages),
        "list_page_big": lambda: page_latency(url, TOKENS["big"], args.pages),
    }


def timed_row(run: Callable[[], dict[str, float]], service: subprocess.Popen[bytes]) -> dict[str, float]:
    """One row's figures plus the service's CPU milliseconds per request while it ran."""
    before = cpu_s(service.pid)
    row = run()
    requests = row.get("requests") or row.get("pages") or 1
    return {**row, "service_cpu_ms_per_request": round(1000 * (cpu_s(service.pid) - before) / requests, 2)}


def paired(services: dict[str, tuple[subprocess.Popen[bytes], str]], job_id: str,
           args: argparse.Namespace) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Every row against every service, `--rounds` times, the order of services alternating by round
    so that drift in the host's load falls on both alike."""
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    names = list(services)
    rows = {name: measure_rows(url, job_id, args) for name, (_, url) in services.items()}
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for row in rows[names[0]]:
            for name in order:
                figures = timed_row(rows[name][row], services[name][0])
                results.setdefault(row, {}).setdefault(name, []).append(figures)
                print(f"round {round_index + 1} {row} {name}: p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
                      f"service CPU {figures['service_cpu_ms_per_request']} ms/request", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, list[dict[str, float]]]], clients: int) -> None:
    """A Markdown table: each service's median p50/p99 and CPU per request; with a baseline, the
    paired ratios (median over rounds of this tree's figure ÷ the baseline's in the same round)."""
    def med(rows: list[dict[str, float]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    print("| measurement | service | requests/s | p50 ms | p99 ms | service CPU ms/request |")
    print("|---|---|---:|---:|---:|---:|")
    for row, by_service in results.items():
        for name, rows in by_service.items():
            rps = med(rows, "rps") if "rps" in rows[0] else "–"
            label = f"{row} ({clients} clients)" if "rps" in rows[0] else f"{row} (limit 20)"
            print(f"| {label} | {name} | {rps} | {med(rows, 'p50_ms')} | {med(rows, 'p99_ms')} | "
                  f"{med(rows, 'service_cpu_ms_per_request')} |")
    if not all("baseline" in by_service for by_service in results.values()):
        return
    print("\n| measurement | p50 ratio | p99 ratio | CPU/request ratio |  (this tree ÷ baseline, paired median)")
    print("|---|---:|---:|---:|")
    for row, by_service in results.items():
        ratios = {key: round(statistics.median(new[key] / base[key] for new, base in
                                               zip(by_service["this tree"], by_service["baseline"])), 2)
                  for key in ("p50_ms", "p99_ms", "service_cpu_ms_per_request")}
        print(f"| {row} | {ratios['p50_ms']}× | {ratios['p99_ms']}× | {ratios['service_cpu_ms_per_request']}× |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="a checkout of another revision (e.g. `git worktree add --detach DIR REV`): its "
                             "service runs beside this tree's on the same S3 state, and every row is paired")
    parser.add_argument("--pages", type=int, default=100,
                        help="list pages fetched one after another per measurement (p99 needs about 100)")
    parser.add_argument("--rounds", type=int, default=1, help="times each row is measured against each service")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lathe-bench-"))
    s3_port = free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL")})
    moto = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    services: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        wait_http(endpoint + "/moto-api/")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        seed_tiny_job_inputs(s3, BUCKET)
        tokens = tmp / "tokens.json"
        tokens.write_text(json.dumps({"tenants": [
            {"name": name, "token_sha256": [hashlib.sha256(tok.encode()).hexdigest()],
             "model_prefixes": [f"s3://{BUCKET}/models/"], "dataset_prefixes": [f"s3://{BUCKET}/datasets/"],
             "limits": {"max_concurrent_jobs": 1000}} for name, tok in TOKENS.items()]}))
        state = f"s3://{BUCKET}/state/"
        store = JobStore(open_store(state))
        t0 = time.monotonic()
        seed_jobs(store, "small", args.small)
        seed_jobs(store, "big", args.big)
        seed_s = time.monotonic() - t0

        service_env = {**env, "LATHE_STATE_URI": state, "LATHE_TOKENS_FILE": str(tokens), "LATHE_LAUNCHER": "none",
                       "LATHE_RECONCILE_INTERVAL_S": "0"}
        for name, tree in [("this tree", REPO), *([("baseline", args.baseline.resolve())] if args.baseline else [])]:
            port = free_port()
            services[name] = (start_service(tree, port, service_env), f"http://127.0.0.1:{port}")
        url = services["this tree"][1]
        job_id = httpx.get(f"{url}/v1/jobs", params={"limit": 1},
                           headers={"Authorization": f"Bearer {TOKENS['small']}"}).json()["items"][0]["id"]
        s3_row = s3_load(endpoint, f"state/tenants/small/jobs/{job_id}/status.json", args.seconds, args.clients)
        results = paired(services, job_id, args)
        print(json.dumps({"clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
                          "seeded_jobs": {"small": args.small, "big": args.big}, "seed_s": round(seed_s, 1),
                          "s3_get_status_json": s3_row, "rows": results}, indent=2))
        print(f"\nbare S3 GET of status.json ({args.clients} clients, the floor): {s3_row['rps']} requests/s, "
              f"p50 {s3_row['p50_ms']} ms, p99 {s3_row['p99_ms']} ms\n")
        report(results, args.clients)
        return 0
    finally:
        for proc, _ in services.values():
            proc.terminate()
            proc.wait(20)
        moto.terminate()
        moto.wait(20)


if __name__ == "__main__":
    sys.exit(main())
