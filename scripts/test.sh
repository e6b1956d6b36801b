#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh) and runs the test suite. Extra arguments go to pytest.
#
# Parallel when pytest-xdist is installed (setup_env.sh installs it where it can): one worker
# process per CPU core, at most 4 (MISS_EXT_TEST_WORKERS overrides; 1 runs everything in this
# process), each test file on one worker (--dist loadfile: a file's module fixtures, such as the
# CUDA emulation's compile, are built once), and OMP_NUM_THREADS = cores / workers unless set.
# Why: most tests run small tensors, where one process is bound by Python and dispatch, not by
# arithmetic, so a second process on a 2-core machine nearly halves the suite (2026-12-02, 2
# cores: 452 s with 2 workers against 872 s in one process, bench/RESULTS.md "CI legs"), and a
# worker that crashes is reported as that test's failure while the others go on. At most 4,
# because the large-tensor tests hold several GiB each and every worker imports torch; torch's
# intra-op threads are split between the workers so they do not oversubscribe the cores. A
# worker count given to pytest (-n N, after ours) wins; arguments that need one process (--pdb,
# --trace, -p no:xdist) turn the workers off.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
cores=$(nproc 2>/dev/null || echo 1)
workers=${MISS_EXT_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
for arg in "$@"; do
  case "$arg" in --pdb | --trace | no:xdist) workers=1 ;; esac
done
parallel=()
if [ "$workers" -gt 1 ] && python -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers" --dist loadfile)
  # Files in collection order (tests/conftest.py puts the slowest first); the option is xdist 3.6's.
  if python -c "import inspect, sys, xdist.plugin as p; sys.exit('no-loadscope-reorder' not in inspect.getsource(p))" \
      2>/dev/null; then
    parallel+=(--no-loadscope-reorder)
  fi
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / workers > 0 ? cores / workers : 1 ))}"
  echo "tests: $workers pytest-xdist workers, OMP_NUM_THREADS=$OMP_NUM_THREADS (MISS_EXT_TEST_WORKERS=1: one process)"
fi
# ${a[@]+...}: an empty array is "unbound" under set -u in bash before 4.4.
python -m pytest -q tests ${parallel[@]+"${parallel[@]}"} "$@"
