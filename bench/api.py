"""API benchmark: throughput and latency of the service on loopback, against a local S3 server.

    OMP_NUM_THREADS=1 .venv/bin/python bench/api.py [--seconds 10] [--clients 32] [--big 10000]

Measures, in one run:
- GET /v1/jobs/{id} and POST /v1/jobs:validate with `--clients` concurrent clients (requests/s,
  p50, p99);
- a bare S3 GET of the same job's status.json with the same concurrency (boto3), the floor the
  service's own overhead is reported against;
- GET /v1/jobs page latency (limit 20) for a tenant with 100 and one with `--big` stored jobs.
The service runs as `python -m service.cli serve` (its own process, as deployed), the S3 server as
moto's standalone server; both on 127.0.0.1. Prints a JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


def page_latency(url: str, token: str, pages: int = 30) -> dict[str, float]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--big", type=int, default=10000)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lathe-bench-"))
    s3_port, api_port = free_port(), free_port()
    endpoint, url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{api_port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL")})
    moto = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(s3_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    service = None
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

        service = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(api_port)], cwd=REPO,
            env={**env, "LATHE_STATE_URI": state, "LATHE_TOKENS_FILE": str(tokens), "LATHE_LAUNCHER": "none",
                 "LATHE_RECONCILE_INTERVAL_S": "0"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(url + "/healthz")

        small_headers = {"Authorization": f"Bearer {TOKENS['small']}"}
        job_id = httpx.get(f"{url}/v1/jobs", params={"limit": 1}, headers=small_headers).json()["items"][0]["id"]
        spec = {"version": 1, "model": {"uri": f"s3://{BUCKET}/models/tiny"},
                "dataset": {"uri": f"s3://{BUCKET}/datasets/tiny", "caption_extension": ".txt"},
                "training": {"max_train_steps": 100}, "resources": {"gpus": 1}}
        results = {
            "clients": args.clients, "seconds": args.seconds, "seeded_jobs": {"small": args.small, "big": args.big},
            "seed_s": round(seed_s, 1),
            "s3_get_status_json": s3_load(endpoint, f"state/tenants/small/jobs/{job_id}/status.json", args.seconds,
                                          args.clients),
            "get_job": asyncio.run(http_load(f"{url}/v1/jobs/{job_id}", "GET", args.seconds, args.clients,
                                             small_headers)),
            "validate": asyncio.run(http_load(f"{url}/v1/jobs:validate", "POST", args.seconds, args.clients,
                                              small_headers, {"spec": spec})),
            "list_page_small": page_latency(url, TOKENS["small"]),
            "list_page_big": page_latency(url, TOKENS["big"]),
        }
        s3p50 = results["s3_get_status_json"]["p50_ms"]
        results["get_job_overhead_ratio_p50"] = round(results["get_job"]["p50_ms"] / s3p50, 2)
        results["get_job_overhead_ratio_rps"] = round(results["s3_get_status_json"]["rps"] / results["get_job"]["rps"], 2)
        print(json.dumps(results, indent=2))
        print()
        print("| measurement | requests/s | p50 ms | p99 ms |")
        print("|---|---|---|---|")
        for name in ("s3_get_status_json", "get_job", "validate"):
            r = results[name]
            print(f"| {name} ({args.clients} clients) | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} |")
        for name in ("list_page_small", "list_page_big"):
            r = results[name]
            print(f"| {name} (limit 20) | – | {r['p50_ms']} | {r['p99_ms']} |")
        return 0
    finally:
        if service is not None:
            service.terminate()
            service.wait(20)
        moto.terminate()
        moto.wait(20)


if __name__ == "__main__":
    sys.exit(main())
