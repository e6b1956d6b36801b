#!/usr/bin/env bash
# One call on a lent GPU machine (README, "GPU check"): builds the extension against that
# machine's torch (2.11 there), runs the error probe, then the WHOLE test suite (CPU and CUDA tests
# together, the CMake library's test included) and, unless --tests-only, the GPU benchmarks.
# Everything it writes goes to ${OUT:-gpu_out}/: build.log, info.txt, probe.log, pytest.log,
# junit.xml, summary.txt, bench.md/json, bench_kernels.md/json, bench_fusion.md/json, bench_model.md/json, bench_bank.md/json,
# bench_bank_model.md/json.
#
#   bash scripts/gpu_wheels.sh          # HERE, before the call: wheels the GPU machine lacks -> .whl/
#   run(command="bash scripts/gpu_check.sh --tests-only", carry=[".whl"])      # on the GPU machine
#   run(command="bash scripts/gpu_check.sh --bench-only", carry=[".whl"])      # then the benchmarks
#
# Crashes: the suite runs under pytest-xdist (installed there), whose workers are processes. A test
# that kills its worker (a segfault, an abort) is reported as a failure naming the test, a new
# worker takes over, and the rest of the suite keeps running. pytest-timeout (also there) turns a
# hang into a failure. Without xdist the suite runs in one process, and a crash ends it: the
# summary then says so instead of reporting a pass.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BENCH=1
TESTS=1
[ "${1:-}" = "--tests-only" ] && BENCH=0
[ "${1:-}" = "--bench-only" ] && TESTS=0   # a second call on a warm machine: the build is kept
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="$(nproc)"   # the CMake library test builds with it too

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import expecttest" 2>/dev/null || echo "WARNING: expecttest missing: opcheck tests will fail (run scripts/gpu_wheels.sh here and carry .whl)"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
{ "$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; c++ --version | head -1; } | tee -a "$OUT/gpu.txt"
# Build for the visible GPU only (sm_90 on an H200), all cores.
start=$(date +%s)
if ! MISS_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    "$PY" setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log" | "$PY" scripts/build_progress.py; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
"$PY" -m miss_ext.info | tee "$OUT/info.txt"

# The error probe first, alone (seconds): with a C++ runtime mix-up (issue 9) every error message
# with a number crashed the process. Its verdict is on screen even if the suite takes long. The
# runtime probe names the objects that serve libstdc++'s ostream/locale calls, before and after
# CUDA is initialised (the driver's libraries load then).
{ "$PY" scripts/cxx_runtime_probe.py; "$PY" scripts/cxx_runtime_probe.py --cuda; } >"$OUT/cxx_runtime.txt" 2>&1
grep -E "FOREIGN|cxx_runtime" "$OUT/cxx_runtime.txt" | head -4
"$PY" -m pytest -q -p no:cacheprovider tests/test_errors.py tests/test_cxx_runtime.py -k "fresh_process or foreign or private" \
  2>&1 | tee "$OUT/probe.log" | tail -3

tests_rc=0
if [ "$TESTS" = 1 ]; then
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 8 --max-worker-restart=1000)
  fi
  TIMEOUT=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TIMEOUT=(--timeout=900)
  fi
  start=$(date +%s)
  "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${TIMEOUT[@]}" --junitxml="$OUT/junit.xml" -rfE tests \
    >"$OUT/pytest.log" 2>&1
  tests_rc=$?
  echo "tests: $(( $(date +%s) - start )) s, rc=$tests_rc"
  # Crashed tests (xdist: "worker 'gwN' crashed while running 'tests/...'") and failures, by name.
  {
    echo "pytest rc=$tests_rc; $(tail -1 "$OUT/pytest.log")"
    grep -E "crashed while running|^FAILED|^ERROR" "$OUT/pytest.log" | sort -u | head -200
    if [ ${#XDIST[@]} -eq 0 ] && [ "$tests_rc" -gt 5 ]; then echo "the pytest process itself died (rc=$tests_rc)"; fi
  } | tee "$OUT/summary.txt"
  # The warp-per-row fold and 2-D tile_add kernels (issue 11) never ran before a GPU session:
  # memcheck them (no shared memory, so no racecheck).
  if command -v compute-sanitizer >/dev/null; then
    # (MISS_EXT_TEST_NO_PROFILER: CUPTI, behind the tests' kernel-name checks, does not run under it)
    MISS_EXT_TEST_NO_PROFILER=1 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_impl_choice.py -k "(fold_kernels and warp) or (tile_add_kernels and grid2d)" \
      >"$OUT/memcheck_new_kernels.log" 2>&1
    echo "memcheck new kernels: rc=$? ($(grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck_new_kernels.log" | tail -2 | tr '\n' ' '))"
  fi
fi

if [ "$BENCH" = 1 ]; then
  "$PY" bench/bench_linear.py --preset gpu --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.md" | grep -E "^\||^##|^- " | head -60
  # Kernel bandwidth against a device copy, every forced implementation beside "auto" (issue 11).
  "$PY" bench/bench_kernels.py --device cuda --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.md" | grep -E "^\||^- "
  # What a fused base-GEMM epilogue could still save: its GEMM-shaped bound beside miss (issue 11).
  "$PY" bench/bench_fusion.py --device cuda --json "$OUT/bench_fusion.json" 2>&1 | tee "$OUT/bench_fusion.md" | grep -E "^\||^- "
  # Mixed-adapter batches (issue 14): one layer, bf16 base and fp32 blocks as PEFT keeps them.
  "$PY" bench/bench_bank.py --device cuda --dtype bf16 --reps 30 --json "$OUT/bench_bank.json" 2>&1 \
    | tee "$OUT/bench_bank.md" | tail -8
  if "$PY" -c "import transformers, peft" 2>/dev/null; then
    "$PY" bench/bench_model.py --preset gpu --json "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.md" | grep -E "^\|" | head -20
    "$PY" bench/bench_bank_model.py --device cuda --dtype bf16 --seqs 64 --seq-len 256 --reps 10 \
      --json "$OUT/bench_bank_model.json" 2>&1 | tee "$OUT/bench_bank_model.md" | tail -8
  else
    echo "bench_model: skipped (transformers/peft not installed on this machine)"
  fi
fi

echo
[ "$TESTS" = 1 ] && echo "summary: tests rc=$tests_rc ($(tail -1 "$OUT/pytest.log"))"
exit "$tests_rc"
