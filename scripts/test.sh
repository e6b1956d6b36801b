#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
