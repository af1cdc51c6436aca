#!/usr/bin/env bash
# The GPU checks, prepared for a session that is lent a GPU machine whose image has torch but not the
# trainer's own libraries (and no package index). Two steps:
#   bench/gpu_run.sh wheels   # here, with the venv installed: wheels for the missing packages into .whl/
#                             # (add /.whl/ to .git/info/exclude; carry .whl to the machine)
#   bench/gpu_run.sh run      # there, from the repo root: installs .whl/*, runs the rows, writes to $OUT
# The versions are this venv's, so the GPU run uses what the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
wheels)
    pkgs=()
    for name in diffusers lycoris_lora msgspec boto3 botocore s3transfer jmespath importlib_metadata toml; do
        pkgs+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pkgs[@]}"
    ls .whl
    ;;
run)
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    out=${OUT:-bench-gpu}
    mkdir -p "$out"
    nvidia-smi -L
    # SDXL at 1024², batch 1: eager rows against compiled ones, each profiled (device-busy fraction).
    timeout "${SDXL_TIMEOUT:-420}" python3 bench/train.py --device cuda --models sdxl --batch-sizes 1 \
        --variants fp32,bf16,bf16+gc,bf16+compile,bf16+gc+compile --steps 10 --warmup 3 --profile \
        --json "$out/train-sdxl-bs1.json" --out "$out/train-sdxl-bs1.md" || true
    timeout "${SD15_TIMEOUT:-150}" python3 bench/train.py --device cuda --models sd15 --batch-sizes 1,4 \
        --variants fp32,bf16,bf16+compile --steps 10 --warmup 3 --profile \
        --json "$out/train-sd15.json" --out "$out/train-sd15.md" || true
    ;;
*)
    echo "usage: bench/gpu_run.sh wheels|run" >&2
    exit 2
    ;;
esac
