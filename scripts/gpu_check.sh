#!/usr/bin/env bash
# One call on a GPU machine: build, CUDA tests, GPU benchmarks; results under $OUT; a table last.
# Target machine (design.md 6): python3 3.12, torch 2.11 (CUDA 13.0), transformers, pytest,
# pytest-benchmark, nvcc 13.0, no network. Must finish in under 8 minutes, CUDA tests first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 STEPFLOW_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Build only for the card in hand (faster), unless the caller chose archs.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "8.0;9.0")
  export TORCH_CUDA_ARCH_LIST
fi
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)

echo "== build ($TORCH_CUDA_ARCH_LIST)"
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import stepflow_ext as s; print('cuda_compiled', s._C.cuda_compiled, s._C.cuda_archs)" | tee -a "$OUT/build.log"

echo "== CUDA tests"
# Only the CUDA test files: collecting the others would import packages the GPU machine lacks (scipy, math-verify).
timeout 240 $PY -m pytest -q -m cuda tests/test_cuda_*.py --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== GPU benchmarks"
timeout $((450 - ($(date +%s) - start))) $PY benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary ($(( $(date +%s) - start )) s)"
grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -1
echo "cuda tests rc=$tests_rc  bench rc=$bench_rc"
[ -f "$OUT/gpu_bench.table" ] && cat "$OUT/gpu_bench.table"
exit $(( tests_rc != 0 || bench_rc != 0 ))
