#!/usr/bin/env bash
# One call on a lent GPU machine (see README, "GPU check"): builds the extension against that
# machine's torch (2.11 there), runs the whole test suite (the CUDA cases run when a GPU is
# visible), runs the GPU benchmark, and prints a short table. Everything it writes goes to
# ${OUT:-gpu_out}/ (build.log, info.txt, pytest.log, bench.md, bench.json, bench_model.*).
#
# The machine has no network. Python packages it lacks (expecttest, needed by opcheck) can
# travel as wheels in .whl/ (ignored by git): `pip download --no-deps -d .whl expecttest`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import expecttest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# Build for the visible GPU only (sm_90 on an H200), all cores.
start=$(date +%s)
if ! MISS_EXT_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
"$PY" -m miss_ext.info | tee "$OUT/info.txt"

# The CMake variant is built and tested by CI on the CPU machine; building it here would spend
# minutes of the GPU session's budget, so its test is left out.
"$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cmake_library.py 2>&1 | tee "$OUT/pytest.log" | tail -25
tests_rc=${PIPESTATUS[0]}

"$PY" bench/bench_linear.py --preset gpu --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.md" | grep -E "^\||^##|^- " | head -60

# Whole-model training step (needs transformers and peft, which the GPU machine may lack).
if "$PY" -c "import transformers, peft" 2>/dev/null; then
  "$PY" bench/bench_model.py --preset gpu --json "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.md" | grep -E "^\|" | head -20
else
  echo "bench_model: skipped (transformers/peft not installed on this machine)"
fi

echo
echo "summary: tests rc=$tests_rc ($(tail -1 "$OUT/pytest.log"))"
exit "$tests_rc"
