#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh) and runs the main job: the layer benchmark.
# Extra arguments go to bench/bench_linear.py (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python bench/bench_linear.py "$@"
