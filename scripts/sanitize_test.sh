#!/usr/bin/env bash
# Builds the C++ of miss_ext with AddressSanitizer + UndefinedBehaviorSanitizer (MISS_EXT_SANITIZE=1,
# CPU kernels) in a copy of this checkout (build/sanitize/), and runs a representative part of the
# test suite against it: every op against the float64 reference, bad input, bat, dropout, the
# module, the adapter bank, and the hypothesis properties. Any ASan or UBSan report aborts the process (UBSan is
# built with -fno-sanitize-recover), so a green run had none.
#
#   bash scripts/sanitize_test.sh [pytest args...]     # with the project's venv active (setup_env.sh)
#
# Python and torch are not instrumented, so the ASan runtime is preloaded. detect_leaks=0: the
# interpreter and torch keep allocations alive at exit by design, which LeakSanitizer would list.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=build/sanitize
start=$SECONDS
python3 scripts/copy_sources.py "$dir"
cd "$dir"
echo "sanitize: building the CPU kernels with -fsanitize=address,undefined -O1 (3-5 min on 2 cores)"
MISS_EXT_SANITIZE=1 MISS_EXT_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" python setup.py -q build_ext --inplace 2>&1 \
  | python3 scripts/build_progress.py
# libstdc++ is preloaded too: ASan resolves the real __cxa_throw when it starts, and Python itself
# does not link libstdc++ (without it the first C++ exception, in triton's import, aborts).
asan=$(c++ -print-file-name=libasan.so)
cxxrt=$(c++ -print-file-name=libstdc++.so)
export LD_PRELOAD="$asan $cxxrt" \
  ASAN_OPTIONS="detect_leaks=0:protect_shadow_gap=0:abort_on_error=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
python -c "import miss_ext, sys; s = miss_ext.build_info()['sanitize']; print('sanitizers:', s); sys.exit(0 if s == 'address,undefined' else 'not a sanitizer build')"
# The library really is instrumented: it calls ASan's and UBSan's report functions.
symbols=$(nm -D --undefined-only miss_ext/_C*.so)
case "$symbols" in *__asan_report_load*) ;; *) echo "miss_ext/_C is not instrumented by ASan" >&2; exit 1 ;; esac
case "$symbols" in *__ubsan_handle_*) ;; *) echo "miss_ext/_C is not instrumented by UBSan" >&2; exit 1 ;; esac
python -m pytest -q -p no:cacheprovider tests/test_ops_reference.py tests/test_errors.py tests/test_bat.py \
  tests/test_dropout.py tests/test_module.py tests/test_properties.py tests/test_bank.py tests/test_bank_layer.py "$@"
echo "sanitize: no report; $((SECONDS - start)) s in all"
