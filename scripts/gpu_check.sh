#!/usr/bin/env bash
# One call on a lent GPU machine (README, "GPU check"): builds the extension against that
# machine's torch (2.11 there), runs the error probe, then the test suite in two parts (the tests
# that need a GPU, then compute-sanitizer on the newest kernels and, with --tests-only, beside it
# every other test, the CMake library's included) and, unless --tests-only, the GPU benchmarks.
# Everything it writes (gpu.txt, build.log, info.txt, cxx_runtime.txt, probe.log, split_rounding.txt,
# pytest_{cuda,rest}.log, junit_{cuda,rest}.xml, summary.txt, memcheck_new_kernels.log,
# racecheck_bank.log, bench*.md/json) goes to a
# work folder whose tarball ${OUT:-gpu_out}/results.tgz is rewritten after every step, beside
# ${OUT}/summary.txt: the device tool returns at most 8 files from $OUT, and a call killed at its
# time limit still returns the last tarball.
#
#   bash scripts/gpu_wheels.sh          # HERE, before the call: wheels the GPU machine lacks -> .whl/
#   run(command="bash scripts/gpu_check.sh --tests-only", carry=[".whl"])      # on the GPU machine
#   run(command="CALL_LIMIT_S=<budget_left_s - 60> bash scripts/gpu_check.sh --bench-only", carry=[".whl"])
#
# A session has 15 minutes of device time, start included: the second call gets what the first
# left (235 s on 2026-12-04, when the sanitizers still ran before the rest part; they now run beside
# it, which should leave about 150 s more), so send it at once (a warm machine goes back after 30 s idle, and a new
# one needs minutes) with CALL_LIMIT_S set from `status`'s budget_left_s, so that every step's
# limit fits the call. The benchmarks run in order of what the open issues need (issue 11's
# targets first); those the deadline leaves no time for are reported as skipped.
#
# Crashes: the suite runs under pytest-xdist (installed there), whose workers are processes. A test
# that kills its worker (a segfault, an abort) is reported as a failure naming the test, a new
# worker takes over, and the rest of the suite keeps running. pytest-timeout (also there) turns a
# hang into a failure. Without xdist the suite runs in one process, and a crash ends it: the
# summary then says so instead of reporting a pass.
set -uo pipefail
[ -n "${OUT:-}" ] && OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"   # a relative $OUT: the caller's cwd
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
RES="$(mktemp -d /tmp/gpu_check.XXXXXX)"   # the files; $OUT gets results.tgz and summary.txt
: >"$RES/summary.txt"
# summary.txt is written line by line, $OUT's copy at once: a call killed at 600 s still has it.
note() { echo "$*" | tee -a "$RES/summary.txt"; cp "$RES/summary.txt" "$OUT/summary.txt"; }
# Its own temporary name per process: the sanitizers pack from the background beside the rest part.
# (tar's 1: a log that grew while it read, the other process's; the tarball is still whole.)
pack() {
  local tmp="$OUT/results.tgz.$BASHPID.part" rc=0
  tar czf "$tmp" -C "$RES" . 2>/dev/null || rc=$?
  if [ "$rc" -le 1 ]; then mv -f "$tmp" "$OUT/results.tgz"; else rm -f "$tmp"; fi
}
# The device tool kills a call at 600 s and then returns only what $OUT holds: every long step
# below gets the time left before DEADLINE, so the summary and tarball are always written.
DEADLINE=$((SECONDS + ${CALL_LIMIT_S:-570}))
left() { local s=$((DEADLINE - SECONDS - $1)); [ "$s" -gt 10 ] && echo "$s" || echo 10; }
# left $1, but at most $2 seconds.
capped() { local s; s=$(left "$1"); [ "$s" -gt "$2" ] && echo "$2" || echo "$s"; }
PY="${PYTHON:-python3}"
BENCH=1
TESTS=1
case "${1:-}" in
  "") ;;
  --tests-only) BENCH=0 ;;
  --bench-only) TESTS=0 ;;   # a second call on a warm machine: the build is kept
  *) echo "usage: $0 [--tests-only|--bench-only]" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "usage: $0 [--tests-only|--bench-only]" >&2; exit 2; }
note "gpu_check ${1:-(tests and benchmarks)}: deadline ${CALL_LIMIT_S:-570} s"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="$(nproc)"   # the CMake library test builds with it too

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" -c "import expecttest" 2>/dev/null || echo "WARNING: expecttest missing: opcheck tests will fail (run scripts/gpu_wheels.sh here and carry .whl)"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/gpu.txt"
# transformers and peft too: the rest part's PEFT/transformers tests run with that machine's (CI: its own).
{ "$PY" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  "$PY" -c "
import importlib.metadata as m
for p in ('transformers', 'peft', 'safetensors', 'pytest', 'pytest-xdist', 'expecttest'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'not installed')"
  c++ --version | head -1; } | tee -a "$RES/gpu.txt"
# Build for the visible GPU only (sm_90 on an H200), all cores. A second call on the same machine
# (--bench-only) skips it when the sources are the ones built: the device tool copies the tree
# again, and new modification times alone would make ninja rebuild everything (about a minute).
src_hash() { { echo "${TORCH_CUDA_ARCH_LIST:-9.0}"; cat setup.py; find csrc -type f -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -d' ' -f1; }
start=$(date +%s)
if [ "$TESTS" = 0 ] && ls miss_ext/_C*.so >/dev/null 2>&1 && [ "$(cat build/.gpu_check_src_hash 2>/dev/null)" = "$(src_hash)" ]; then
  note "build: kept (sources unchanged since this machine built them)"
elif ! MISS_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" timeout -k 10 "$(left 60)" \
    "$PY" setup.py build_ext --inplace 2>&1 | tee "$RES/build.log" | "$PY" scripts/build_progress.py; then
  tail -40 "$RES/build.log"; note "BUILD FAILED after $(( $(date +%s) - start )) s (build.log in results.tgz)"; pack; exit 1
else
  mkdir -p build && src_hash >build/.gpu_check_src_hash
  note "build: $(( $(date +%s) - start )) s"
fi
"$PY" -m miss_ext.info | tee "$RES/info.txt"
pack

# The error probe (about 45 s, mostly fresh processes): with a C++ runtime mix-up (issue 9) every
# error message with a number crashed the process. It runs in the background beside the cuda part
# (its verdict is noted after that part), which leaves the rest part the time it needs to finish
# (2026-12-04: 4,328 of its 4,329 tests done when its limit stopped it). The runtime probe names
# the objects that serve libstdc++'s ostream/locale calls, before and after CUDA is initialised
# (the driver's libraries load then). (Not repeated by --bench-only: the first call ran it on
# this build.)
PROBE_PID=
if [ "$TESTS" = 1 ]; then
  # How cuBLAS rounds the split path's in-place y += a @ b by shape (seconds; tests/GPU.md,
  # 2026-12-04): whether the 16 MiB limit of split_gemm.cpp's fp32 product holds. Alone, first.
  timeout -k 10 90 "$PY" scripts/diagnose_split_rounding.py >"$RES/split_rounding.txt" 2>&1
  note "split rounding diagnosis: rc=$? (split_rounding.txt)"
  (
    { "$PY" scripts/cxx_runtime_probe.py; "$PY" scripts/cxx_runtime_probe.py --cuda; } >"$RES/cxx_runtime.txt" 2>&1
    timeout -k 10 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_errors.py tests/test_cxx_runtime.py \
      -k "fresh_process or foreign or private" >"$RES/probe.log" 2>&1
    echo $? >"$RES/probe.rc"
  ) &
  PROBE_PID=$!
  pack
fi
# The probe's verdict, once it has finished.
probe_verdict() {
  [ -n "$PROBE_PID" ] || return 0
  wait "$PROBE_PID"
  PROBE_PID=
  grep -E "FOREIGN|cxx_runtime" "$RES/cxx_runtime.txt" | head -4
  note "error probe: rc=$(cat "$RES/probe.rc" 2>/dev/null || echo none); $(tail -1 "$RES/probe.log")"
  pack
}

tests_rc=0
memcheck_rc=0
# One part of the suite (--miss-part, tests/conftest.py: "cuda" the tests that need a GPU, which CI's
# CPU machines skip; "rest" the others) within LIMIT seconds: pytest_PART.log, junit_PART.xml, its
# lines in the summary; the part's verdict joins tests_rc (1 a failure, 3 stopped by its limit, 5
# pytest could not run, the worst kept), except a stopped rest part (COUNT_STOP=0): CI runs those
# tests on every push, so running out of time there is reported, not counted.
run_part() {
  local part="$1" limit="$2" count_stop="${3:-1}" start rc stopped=0
  start=$(date +%s)
  # SIGINT at the limit: pytest still writes its summary and junit.xml. Two threads per worker:
  # a worker per core with torch's default (a thread per core) would oversubscribe the CPUs.
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" timeout -s INT -k 20 "$limit" \
    "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${TIMEOUT[@]}" --junitxml="$RES/junit_$part.xml" -rfE \
    --miss-part "$part" tests >"$RES/pytest_$part.log" 2>&1
  rc=$?
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && stopped=1
  # Crashed tests (xdist: "worker 'gwN' crashed while running 'tests/...'") and failures, by name.
  {
    echo "tests ($part): $(( $(date +%s) - start )) s, pytest rc=$rc; $(tail -1 "$RES/pytest_$part.log")"
    if [ "$stopped" = 1 ]; then echo "the $part tests were stopped by their $limit s limit: INCOMPLETE"; fi
    grep -E "crashed while running|^FAILED|^ERROR" "$RES/pytest_$part.log" | sort -u | head -200
    if [ ${#XDIST[@]} -eq 0 ] && [ "$rc" -gt 5 ] && [ "$stopped" = 0 ]; then echo "the pytest process itself died (rc=$rc)"; fi
  } | tee -a "$RES/summary.txt"
  cp "$RES/summary.txt" "$OUT/summary.txt"
  # This script's own exit codes (README, "GPU check"): 124/137 would read as "the call ran past
  # its limit" in the device tool's answer, and pytest's 2-5 (interrupted, internal error, usage
  # error, no tests) would collide with 2-4 here.
  case "$rc" in
    0) ;;
    1) [ "$tests_rc" = 0 ] || [ "$tests_rc" = 3 ] && tests_rc=1 ;;
    *) if [ "$stopped" = 1 ]; then [ "$tests_rc" = 0 ] && [ "$count_stop" = 1 ] && tests_rc=3
       else note "pytest could not run the $part tests (rc=$rc)"; tests_rc=5; fi ;;
  esac
  pack
}
if [ "$TESTS" = 1 ]; then
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null; then
    # One worker per core. loadgroup: the tests spread one by one, but those of an xdist_group
    # (test_large_tensors.py's, several GiB each) stay on one worker, one at a time.
    XDIST=(-n "$(nproc)" --dist loadgroup --max-worker-restart=1000)
  fi
  TIMEOUT=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TIMEOUT=(--timeout=300)   # one hung test fails alone, well inside the call's 600 s
  fi
  # The tests that need a GPU first (what only this machine can check; CI runs the others on
  # CPUs), then the sanitizers and the rest. On 2026-12-04 the whole suite in one go (8 workers)
  # was stopped at 293 s with about two thirds run.
  run_part cuda "$(left 200)"
  probe_verdict
  # The sanitizers' runs and verdict (memcheck_rc: 0 clean or not run, 3 stopped by a time limit,
  # 4 a finding or a failed test), also into $RES/sanitizers.rc: with --tests-only they run in the
  # background beside the rest part (see below), in a subshell whose variables the caller cannot see.
  # MEMCHECK_CAP: memcheck's own limit.
  sanitizers() {
    # Kernels that never ran before a GPU session: split_bf16 (issue 11, 2026-12-04), the
    # warp-per-row fold and 2-D tile_add (issue 11, no shared memory) and the adapter bank's five
    # kernels (issue 14; bank_fold's two since 2026-11-30): memcheck their tests, and racecheck the bank kernels, which share memory between
    # threads.
    SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
    # Some machines cannot run it at all ("Device not supported", then error 999 at the first
    # allocation, seen on gVisor hosts): tried first on a one-element CUDA tensor, so such a machine
    # reports "not run" rather than a memcheck failure.
    # The probe gets up to 90 s, never more than the call has left; one stopped by that limit is
    # reported as stopped (incomplete), not as a machine that cannot run the sanitizer.
    sanitizer_ok=0
    probe_rc=none
    probe_limit=$(left 75); [ "$probe_limit" -gt 90 ] && probe_limit=90
    if [ -x "$SANITIZER" ]; then
      timeout -k 10 "$probe_limit" "$SANITIZER" --tool memcheck --error-exitcode 99 \
        "$PY" -c "import torch; assert torch.ones(1, device='cuda').sum().item() == 1" >"$RES/sanitizer_probe.log" 2>&1
      probe_rc=$?
      [ "$probe_rc" = 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$RES/sanitizer_probe.log" && sanitizer_ok=1
    fi
    if [ "$sanitizer_ok" = 1 ]; then
      # (MISS_EXT_TEST_NO_PROFILER: CUPTI, behind the tests' kernel-name checks, does not run under it)
      # The newest kernels first (split_bf16's, 2026-12-04; then bank_fold's), so that a memcheck cut
      # by its limit has checked them: --miss-given-order keeps the files in this order (by default
      # tests/conftest.py runs test_impl_choice.py first, as on 2026-12-04).
      MISS_EXT_TEST_NO_PROFILER=1 timeout -k 10 "$(capped 75 "$MEMCHECK_CAP")" "$SANITIZER" --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider \
        --miss-given-order tests/test_split_bf16.py tests/test_bank_fold.py tests/test_bank.py tests/test_impl_choice.py \
        -k "(split_bf16 and cuda) or (fold_kernels and warp) or (tile_add_kernels and grid2d) or (bank and cuda)" \
        >"$RES/memcheck_new_kernels.log" 2>&1
      memcheck_rc=$?
      note "memcheck new kernels: rc=$memcheck_rc ($(grep -E "ERROR SUMMARY|passed|failed" "$RES/memcheck_new_kernels.log" | tail -2 | tr '\n' ' '))"
      pack
      MISS_EXT_TEST_NO_PROFILER=1 timeout -k 10 "$(capped 15 60)" "$SANITIZER" --tool racecheck --kernel-name kns=bank_ --error-exitcode 99 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_bank.py tests/test_bank_fold.py \
        -k "cuda and (matches or backward or gradients or rows_equal)" \
        >"$RES/racecheck_bank.log" 2>&1
      racecheck_rc=$?
      note "racecheck bank kernels: rc=$racecheck_rc ($(grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$RES/racecheck_bank.log" | tail -2 | tr '\n' ' '))"
      # One verdict for both: a finding (99) or a failed test under a sanitizer is a failure (4) even
      # where the other was stopped by its time limit; only stopped, it is incomplete (3).
      if [ "$memcheck_rc" = 99 ] || [ "$racecheck_rc" = 99 ]; then memcheck_rc=4
      elif [ "$memcheck_rc" != 0 ] && [ "$memcheck_rc" != 124 ] && [ "$memcheck_rc" != 137 ]; then memcheck_rc=4
      elif [ "$racecheck_rc" != 0 ] && [ "$racecheck_rc" != 124 ] && [ "$racecheck_rc" != 137 ]; then memcheck_rc=4
      elif [ "$memcheck_rc" != 0 ] || [ "$racecheck_rc" != 0 ]; then
        note "a sanitizer was stopped by its time limit: incomplete, not failed"; memcheck_rc=3
      fi
    elif [ "$probe_rc" = 124 ] || [ "$probe_rc" = 137 ]; then
      note "memcheck new kernels: NOT RUN, the sanitizer probe was stopped by its ${probe_limit} s limit (incomplete: this machine may still run it)"
      memcheck_rc=3
    elif [ -x "$SANITIZER" ]; then
      note "memcheck new kernels: NOT RUN, compute-sanitizer does not work on this machine (probe rc=$probe_rc) ($(tail -2 "$RES/sanitizer_probe.log" | tr '\n' ' '))"
    else
      note "memcheck new kernels: NOT RUN, compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
    fi
    echo "$memcheck_rc" >"$RES/sanitizers.rc"
  }
  # The rest with --tests-only (the benchmarks' call comes after); with the benchmarks in this call
  # they get the time, and the sanitizers run alone. With --tests-only the sanitizers (one process,
  # mostly waiting on the GPU) run in the background beside the rest part (CPU tests, a worker per
  # core but one): on 2026-12-04 17:27Z they took about 170 s of the call one after the other,
  # which the benchmarks' call lacked. The rest part's tests need no GPU (a few use one where it is
  # there, the demo's) and memcheck checks its own process only, so neither changes what the other
  # checks; memcheck gets more time there, as long as the rest part takes anyway. Under a minute
  # left is too little for the rest part's workers to start.
  if [ "$BENCH" = 1 ]; then
    MEMCHECK_CAP=150 sanitizers
    note "tests (rest): not run (the benchmarks take this call's time; --tests-only runs them)"
  elif [ "$(left 10)" -lt 60 ]; then
    short=$(left 10)
    MEMCHECK_CAP=150 sanitizers
    note "tests (rest): not run, $short s left after the cuda part (CI runs them on the CPU)"
  else
    MEMCHECK_CAP=200 sanitizers &   # with the probe and racecheck about the rest part's 230-250 s
    SAN_PID=$!
    [ ${#XDIST[@]} -gt 0 ] && [ "$(nproc)" -gt 2 ] && XDIST[1]=$(( $(nproc) - 1 ))
    run_part rest "$(left 10)" 0
    wait "$SAN_PID"
    memcheck_rc=$(cat "$RES/sanitizers.rc" 2>/dev/null || echo 3)
  fi
  pack
fi

bench_rc=0
# One benchmark: its whole output to $RES/NAME.md (no pipe to a pager or head: a reader that
# stops early would kill it with SIGPIPE before it writes its JSON), its exit status recorded,
# the lines FILTER selects shown here, and the tarball refreshed.
# CAP: its own limit, so that one slow or hung benchmark leaves time to the others; none starts
# with under 45 s before the deadline (torch + CUDA start-up alone takes a good part of that).
bench() {
  local name="$1" cap="$2" filter="$3"; shift 3
  local start=$SECONDS limit
  limit=$(left 15)
  if [ "$limit" -lt 45 ]; then note "$name: skipped, ${limit} s left before the deadline"; bench_rc=1; return; fi
  [ "$limit" -gt "$cap" ] && limit=$cap
  timeout -k 10 "$limit" "$PY" "$@" --json "$RES/$name.json" >"$RES/$name.md" 2>&1
  local rc=$?
  note "$name: rc=$rc, $((SECONDS - start)) s (limit $limit s)"
  if [ "$rc" != 0 ]; then bench_rc=1; tail -5 "$RES/$name.md"; fi
  grep -E "$filter" "$RES/$name.md"
  pack
}
if [ "$BENCH" = 1 ]; then
  # In the order the open issues need them: issue 11's layer and model targets, the measured choices
  # between its alternatives (bench_fusion) and where its time goes (profile_linear), its kernel
  # bandwidth targets, then issue 14's figures. On 2026-12-04 17:27Z the call had 235 s: bench_linear
  # (110 s at 100 reps, 78 s of them timed reps) and profile_linear ran, bench_model was stopped
  # after two of its three modes, the rest were skipped. 50 reps: the 100-rep medians' p25-p75
  # spread was within 0.01x, so half the reps still tell the targets apart.
  HAVE_HF=0; "$PY" -c "import transformers, peft" 2>/dev/null && HAVE_HF=1
  bench bench 150 "^\\||^##|^- " bench/bench_linear.py --preset gpu --reps 50
  if [ "$HAVE_HF" = 1 ]; then bench bench_model 120 "^\\|" bench/bench_model.py --preset gpu; fi
  # What a fused base-GEMM epilogue could still save: its GEMM-shaped bound beside miss, and the
  # alternatives for dx's tile and y's split add, each against the frozen step (issue 11; about 30 s).
  bench bench_fusion 60 "^\\||^- " bench/bench_fusion.py --device cuda
  # Where issue 11's missing time goes: the kernels of one step, case by case (4096 x 4096).
  bench profile_linear 60 "^## |^- per step" bench/profile_linear.py --preset gpu
  # Kernel bandwidth against a device copy, every forced implementation beside "auto" (issue 11).
  bench bench_kernels 90 "^\\||^- " bench/bench_kernels.py --device cuda
  # Mixed-adapter batches (issue 14): one layer, bf16 base and fp32 blocks as PEFT keeps them.
  bench bench_bank 60 "x single|^(single|mixed|split|gathered|masked) |faster" bench/bench_bank.py --device cuda --dtype bf16 --reps 30
  # Mixed-adapter training, half the adapters mini (mini_r = 1): the bank's block-gradient kernels.
  bench bench_bank_train 45 "x single|^(single|mixed|split) |faster" bench/bench_bank_train.py --device cuda --dtype bf16 --reps 10
  if [ "$HAVE_HF" = 1 ]; then
    bench bench_bank_model 90 "x single|^(single|mixed|split|gathered|masked) |faster" bench/bench_bank_model.py \
      --device cuda --dtype bf16 --seqs 64 --seq-len 256 --reps 10
    # Serving: greedy decoding per token against PEFT, the base model and merged weights (last: no
    # issue asks for it; a first GPU figure for the README's serving numbers).
    bench bench_decode 90 "^\\|" bench/bench_decode.py --preset gpu --modes default,bat --reps 5 --new-tokens 32
    # A call's fixed cost on a few rows (host checks, dispatch, launches), which decides a decode step.
    bench bench_call_overhead 45 "us/call|[0-9]x$" bench/bench_call_overhead.py --device cuda --dtype bf16 --reps 15
  else
    note "bench_model, bench_bank_model: skipped (transformers/peft not installed on this machine)"
  fi
  pack
fi

echo
if [ "$TESTS" = 1 ]; then
  for log in "$RES"/pytest_*.log; do
    [ -e "$log" ] && echo "summary: tests ($(basename "$log" .log | cut -d_ -f2)): $(tail -1 "$log")"
  done
  echo "summary: tests rc=$tests_rc"
fi
[ "$tests_rc" != 0 ] && exit "$tests_rc"
[ "$memcheck_rc" = 3 ] && exit 3
[ "$memcheck_rc" != 0 ] && exit 4
exit "$bench_rc"
