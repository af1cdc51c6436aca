"""Time from process start to the first training step, cold and warm model cache.

Seeds a tiny SD1.5 pipeline and a tiny dataset into a local S3 server, then runs the real trainer
(`python -m trainer run s3://…/spec.json`) on the same job spec several times with one node-local model
cache: the first run downloads the model (cold), the later ones hit the cache (warm). Each run's
`metadata.json` gives `first_step_s` (trainer package import → first optimizer step) and the phase
timings. Side by side, in the same run, the floor: a bare `python -c "import torch, diffusers, lycoris"`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/startup.py [--warm-runs 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import local_s3  # noqa: E402

BUCKET = "lathe-bench"
SPEC = {
    "version": 1,
    "model": {"uri": f"s3://{BUCKET}/models/tiny-sd1", "arch": "sd1"},
    "dataset": {"uri": f"s3://{BUCKET}/datasets/tiny", "resolution": 64, "caption_extension": ".txt",
                "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 8},
    "network": {"algo": "lora", "dim": 4, "alpha": 4},
    "training": {"max_train_steps": 2, "seed": 1},
    "save": {"output_name": "tiny"},
    "shrink": {"enabled": False},
}


def upload(client, root: Path, prefix: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")


def run_job(client, job: str, cache: Path, work: Path) -> dict:
    key = f"jobs/{job}/spec.json"
    client.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(SPEC).encode())
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", f"s3://{BUCKET}/{key}", "--work-dir", str(work)],
                          cwd=REPO, env={**os.environ, "LATHE_CACHE_DIR": str(cache)}, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=f"jobs/{job}/output/metadata.json")["Body"].read())
    t = meta["timings_s"]
    return {"job": job, "model_cache": meta["model_cache"], "first_step_s": round(t["first_step_s"], 2),
            "fetch_s": round(t["fetch_s"], 2), "model_fetch_s": round(t["model_fetch_s"], 3),
            "load_s": round(t["load_s"], 2), "process_wall_s": round(wall, 2)}


def import_floor() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, diffusers, lycoris"], check=True, cwd=REPO,
                   capture_output=True)
    return round(time.monotonic() - t0, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import boto3

    from trainer.models.tiny import build_tiny_pipeline
    from trainer.tools.tinydata import make_tiny_dataset

    with tempfile.TemporaryDirectory(prefix="lathe-startup-") as tmp, local_s3() as (endpoint, _):
        root = Path(tmp)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        upload(client, Path(build_tiny_pipeline("sd1", str(root / "tiny-sd1"))), "models/tiny-sd1")
        make_tiny_dataset(str(root / "data"), images=6, seed=0)
        upload(client, root / "data", "datasets/tiny")
        floor = import_floor()
        runs = [run_job(client, f"run{i}", root / "cache", root / f"w{i}") for i in range(1 + args.warm_runs)]
    warm = [r["first_step_s"] for r in runs[1:]]
    result = {"import_floor_s": floor, "runs": runs,
              "warm_first_step_median_s": statistics.median(warm) if warm else None}
    print("| run | model cache | start → first step s | fetch s (model s) | load s | ratio to import floor |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| `import torch, diffusers, lycoris` | – | {floor:.2f} | – | – | 1.00× |")
    for r in runs:
        print(f"| {r['job']} | {r['model_cache']} | {r['first_step_s']:.2f} | {r['fetch_s']:.2f} "
              f"({r['model_fetch_s']:.2f}) | {r['load_s']:.2f} | {r['first_step_s'] / floor:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
