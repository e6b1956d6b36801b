#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh) and runs the main job: python -m miss_ext.demo
# (fine-tunes a small random-init Llama with MiSS, PEFT side by side, merge check, adapter + loss PNG saved).
# Extra arguments go to the demo (see python -m miss_ext.demo --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m miss_ext.demo "$@"
