#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests, then the engine benchmark on the GPU.
#
# Run from the repository root (the package need not be installed):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Writes to $OUT (default /tmp/gpu_check_out):
#   env.log          nvidia-smi -L, python / torch / CUDA versions
#   cuda_tests.log   pytest tests/test_cuda.py (-x: stops at the first failure)
#   cuda_tests.xml   the same as JUnit XML (every test that ran, with its time)
#   bench_cuda.log   python benchmarks/bench_engine.py --device cuda
#   train_cuda.log   python benchmarks/gpu_train_check.py cuda
#   summary.txt      exit status and seconds of each step
#
# Every step has a timeout (20 + 150 + 150 s at most: about 5.5 minutes in the
# worst case; expect well under 2); a failing or timed-out step does not stop
# the next one. The exit status is pytest's (124 if it timed out).
#
# Environment: OUT (output folder), PYTHON (interpreter; default python3, or
# .venv/bin/python where python3 has no torch, as on a CPU-only dev machine),
# PYTEST_STOP (default -x; set it empty to run every test past a failure).

set -u
set -o pipefail

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PYTEST_STOP="${PYTEST_STOP--x}"

has_torch() { "$1" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; }
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && ! has_torch "$PY" && [ -x .venv/bin/python ] && has_torch .venv/bin/python; then
    PY=.venv/bin/python
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"
start=$SECONDS

# ------------------------------------------------------------------ environment
{
    echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $PWD, interpreter $PY, OUT=$OUT"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout -k 5 20 nvidia-smi -L || echo "nvidia-smi -L failed (status $?)"
    else
        echo "nvidia-smi: not found (no NVIDIA driver here?)"
    fi
    timeout -k 5 20 "$PY" -c '
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch.version.cuda", torch.version.cuda)
ok = torch.cuda.is_available()
print("torch.cuda.is_available():", ok)
if ok:
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"{p.total_memory / 2**30:.1f} GiB", "capability", f"{p.major}.{p.minor}")
' || echo "python/torch version check failed (status $?)"
} 2>&1 | tee "$OUT/env.log"

# ------------------------------------------------------------------ CUDA tests
echo "== pytest tests/test_cuda.py"
t0=$SECONDS
# shellcheck disable=SC2086  # PYTEST_STOP is one optional flag
timeout -k 5 150 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider $PYTEST_STOP \
    --durations=15 --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
test_status=${PIPESTATUS[0]}
echo "pytest: status $test_status in $((SECONDS - t0)) s" | tee -a "$summary"

# ------------------------------------------------------------------ benchmark
echo "== bench_engine.py --device cuda"
t0=$SECONDS
timeout -k 5 150 "$PY" benchmarks/bench_engine.py --device cuda 2>&1 | tee "$OUT/bench_cuda.log"
bench_status=${PIPESTATUS[0]}
echo "bench_engine --device cuda: status $bench_status in $((SECONDS - t0)) s" | tee -a "$summary"

# ------------------------------------------------------------------ training
echo "== gpu_train_check.py (the p0 = 0.499 toy on cuda)"
t0=$SECONDS
timeout -k 5 60 "$PY" benchmarks/gpu_train_check.py cuda 2>&1 | tee "$OUT/train_cuda.log"
echo "gpu_train_check: status ${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$summary"

echo "gpu_check: total $((SECONDS - start)) s; exit status = pytest's ($test_status)" | tee -a "$summary"
exit "$test_status"
