"""Side-by-side A/B of the shrink: an earlier revision's `trainer/` against the working tree's.

Each case runs `shrink_file` in a fresh process (as a CLI call does), alternating the two trees, and
keeps the best of `--tries` (and reports the ratio of medians too); inputs are `bench/shrink.py`'s
generated SDXL-shaped LoRAs (run it once first), with the base-norm cache warm.

    OMP_NUM_THREADS=1 .venv/bin/python bench/shrink_ab.py --rev HEAD~1 [--tries 4] [--work .lathe/bench-shrink]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from trainer.shrink import shrink_file  # in every layout since the shrink has had its package
a = json.loads(sys.argv[2])
t, c = time.perf_counter(), time.process_time()
shrink_file(a["src"], a["out"], base=a.get("base"), **a["rule"])
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""


def cases(work: Path) -> list[tuple[str, dict]]:
    r64, r32, base = (str(work / n) for n in ("sdxl-lora-r64.safetensors", "sdxl-lora-r32.safetensors",
                                               "sdxl-base-attn.safetensors"))
    recipe = {"recipe": "fro_ckpt=1,thr=-3.55"}
    return [("rank 64, `--rank 32`", {"src": r64, "rule": {"rank": 32}}),
            ("rank 64, `sv_fro 0.9`", {"src": r64, "rule": {"method": "sv_fro", "param": 0.9}}),
            ("rank 64, `fro_ckpt` warm", {"src": r64, "rule": recipe, "base": base}),
            ("rank 32, `fro_ckpt` warm", {"src": r32, "rule": recipe, "base": base})]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--tries", type=int, default=4)
    parser.add_argument("--work", default=str(REPO / ".lathe" / "bench-shrink"))
    a = parser.parse_args()
    work = Path(a.work)
    if not (work / "sdxl-lora-r64.safetensors").exists():
        raise SystemExit(f"no inputs under {work}: run bench/shrink.py first, which generates them")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               LATHE_CACHE_DIR=str(work / "norm-cache"))
    with tempfile.TemporaryDirectory() as before:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", a.rev, "trainer"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(before, filter="data")
        trees = {a.rev: before, "working tree": str(REPO)}
        print(f"| case | {a.rev}: wall s | CPU s | working tree: wall s | CPU s | speed-up | median speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, args in cases(work):
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(a.tries):
                for name, tree in trees.items():
                    target = work / "ab-out.safetensors"
                    target.unlink(missing_ok=True)  # a run pays for its own output, not for freeing the last one's
                    payload = json.dumps({**args, "out": str(target)})
                    out = subprocess.run([sys.executable, "-c", CHILD, tree, payload], env=env, check=True,
                                         capture_output=True, text=True).stdout
                    runs[name].append(json.loads(out.strip().splitlines()[-1]))
            old, new = (min(runs[name], key=lambda r: r["wall"]) for name in trees)
            old_median, new_median = (statistics.median(r["wall"] for r in runs[name]) for name in trees)
            print(f"| {label} | {old['wall']:.2f} | {old['cpu']:.2f} | {new['wall']:.2f} | {new['cpu']:.2f} | "
                  f"{old['wall'] / new['wall']:.2f}× | {old_median / new_median:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
