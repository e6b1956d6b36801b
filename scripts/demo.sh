#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh) and runs the main job: python -m miss_ext.demo
# (fine-tunes a small random-init Llama with MiSS, PEFT side by side, merge check, adapter + loss PNG saved).
# Extra arguments go to the demo (see python -m miss_ext.demo --help). It runs in the caller's
# folder, so relative paths (--out, --model, --data) mean what they mean there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
python -m miss_ext.demo "$@"
