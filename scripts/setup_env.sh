#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test/bench dependencies, and builds miss_ext
# in place. Sourced by test.sh and bench.sh; safe to run again (it only rebuilds what changed).
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
python -m pip install -q "${MISS_EXT_TORCH:-torch==2.14.1}" -r requirements-dev.txt
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install -q --no-build-isolation --no-deps -e .
python -m miss_ext.info
