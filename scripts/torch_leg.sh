#!/usr/bin/env bash
# Builds and tests miss_ext against another torch release, in a copy of this checkout with its own
# .venv, so that the main checkout's in-place build (compiled against the default torch) is never
# overwritten or imported by the other torch: a custom op library only loads into the torch it
# was compiled against.
#
#   bash scripts/torch_leg.sh 'torch==2.15.0' [pytest args...]
#
# The copy is build/legs/<spec>/ (scripts/copy_sources.py, refreshed on every call; its .venv and
# build outputs are kept between calls; .ci/run removes each leg's .venv when the leg is done).
# pip is pinned to the requested torch by a constraints file, so the test dependencies cannot
# move it, and that file replaces any machine-wide pip constraint (this machine caps torch at 2.14.1). Build knobs (MISS_EXT_CUDA, MAX_JOBS,
# TORCH_CUDA_ARCH_LIST, ...) pass through to scripts/setup_env.sh. LEG_CONSTRAINTS (pip specs
# separated by spaces, e.g. 'peft<0.22') are added to the constraints file: a leg may pin another
# dependency to an older supported release.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
spec=${1:?usage: torch_leg.sh TORCH_SPEC [pytest args...]}
shift
leg="build/legs/$(printf '%s' "$spec" | tr -c 'A-Za-z0-9.=' '_')"
start=$SECONDS
mkdir -p "$leg"
python3 scripts/copy_sources.py "$leg"
# shellcheck disable=SC2086  # LEG_CONSTRAINTS is a list of words on purpose
printf '%s\n' "$spec" ${LEG_CONSTRAINTS:-} > "$leg/.torch-constraint.txt"
export PIP_CONSTRAINT="$PWD/$leg/.torch-constraint.txt" MISS_EXT_TORCH="$spec"
echo "torch leg $spec${LEG_CONSTRAINTS:+ ($LEG_CONSTRAINTS)} in $leg"
cd "$leg"
bash scripts/test.sh "$@"
echo "torch leg $spec: $((SECONDS - start)) s in all"
