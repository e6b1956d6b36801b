#!/usr/bin/env bash
# Run HERE (a machine with pip access) before a GPU check: downloads into .whl/ (ignored by git)
# the wheels that the GPU machine lacks and cannot fetch (it has no network), for its Python 3.12.
# The device call then carries .whl and scripts/gpu_check.sh installs them into /tmp/site:
#   expecttest: torch.library.opcheck imports torch.testing._internal.common_utils, which needs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
# One version of each: two wheels of one package make gpu_check.sh's whole `pip install` fail.
rm -f .whl/expecttest-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl expecttest==0.3.0
ls -l .whl
