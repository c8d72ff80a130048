#!/usr/bin/env bash
# The GPU checks and benchmarks, in order of importance, each under a time limit.
#
#     bash benchmarks/gpu_check.sh tests    # the gpu-marked tests (about 2 minutes on an H200)
#     bash benchmarks/gpu_check.sh bench    # the U-Net step four ways, its profile, the GEMM host cost (about 6 minutes)
#
# Full outputs go to $OUT (default /tmp/scratchseg-gpu), one file per command;
# the last lines of each are printed as it finishes.
set -u
out=${OUT:-/tmp/scratchseg-gpu}
mkdir -p "$out"
py=${PYTHON:-python3}

run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "-- rc=$? in $((SECONDS - t0)) s"
    tail -n "${TAIL:-14}" "$out/$name.txt"
}

case "${1:-}" in
tests)
    run gpu-tests 400 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/
    ;;
bench)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    # the first benchmark process on a fresh machine can be noisy: defaults run twice
    run step-defaults 100 "$py" benchmarks/train_step.py --backend cupy --rounds 21
    run step-defaults-2 100 "$py" benchmarks/train_step.py --backend cupy --rounds 21
    run step-fp32 100 "$py" benchmarks/train_step.py --backend cupy --rounds 21 --no-tf32 --no-memory
    run step-tf32 100 "$py" benchmarks/train_step.py --backend cupy --rounds 21 --tf32 --no-memory
    TAIL=40 run profile 100 "$py" benchmarks/profile_step.py --backend cupy --gpu-kernels --top 15
    TAIL=20 run gemm-host-cost 60 "$py" benchmarks/gpu_host_cost.py
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh tests|bench" >&2
    exit 2
    ;;
esac
