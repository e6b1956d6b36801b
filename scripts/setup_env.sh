#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test/bench dependencies, and builds miss_ext
# in place. Run by test.sh, bench.sh and demo.sh; safe to run again (it only rebuilds what changed).
#
# Knobs: MISS_EXT_TORCH (pip spec of torch, default torch==2.14.1), PYTHON (default python3), and
# the build knobs of setup.py (MISS_EXT_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# pip byte-compiles what it installs (about 30 of the 126 s a fresh venv with torch 2.11 takes
# here). Kept: this project's machines set PYTHONDONTWRITEBYTECODE=1, so without pip's .pyc files
# every process would compile each module it imports from source, every time (tried 2026-12-03
# with --no-compile: the default leg's suite went from 7.5 to 14 minutes; bench/RESULTS.md).
python -m pip install -q "${MISS_EXT_TORCH:-torch==2.14.1}" -r requirements-dev.txt
# Optional: runs the suite in parallel processes (scripts/test.sh). Not in requirements-dev.txt,
# so a machine without it still installs and tests, in one process.
python -m pip install -q pytest-xdist || echo "pytest-xdist not installable: scripts/test.sh runs the suite in one process"
export MAX_JOBS="${MAX_JOBS:-2}"
# The build prints one line per compiler step (scripts/build_progress.py); the full log is
# build/build.log. Measured on this project's 2-core machines (2026-11-29/30, bench/RESULTS.md):
# CPU + CUDA kernels (arch 8.0;9.0) 140-300 s, CPU-only 130-175 s; a rerun with nothing changed, seconds.
mkdir -p build
start=$SECONDS
echo "building miss_ext in place (MAX_JOBS=$MAX_JOBS; full log: build/build.log)"
if ! python -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee build/build.log \
    | python3 scripts/build_progress.py; then
  tail -n 60 build/build.log
  echo "the build failed; the full log is build/build.log" >&2
  exit 1
fi
echo "build done in $((SECONDS - start)) s"
python -m miss_ext.info
