#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh) and runs the layer benchmark, bench/bench_linear.py
# (fwd+bwd of one adapted nn.Linear against a frozen one and PEFT's MiSS; figures in
# bench/RESULTS.md). Extra arguments go to it (see --help). It runs in the caller's folder, so a
# relative --json path means what it means there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
python "$root/bench/bench_linear.py" "$@"
