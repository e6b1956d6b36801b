#!/usr/bin/env bash
# Builds the CMake variant of the op library (libmiss_ext.so, no Python) and runs its ctest
# checks: the C++ TorchScript example (examples/cpp) in-tree and against `cmake --install` +
# find_package(miss_ext). Uses the active Python's torch and its setup.py-built miss_ext (for
# the fixture that writes the TorchScript files), so run scripts/setup_env.sh first.
#
#   bash scripts/cmake_test.sh [build dir, default build/cmake] [extra cmake -D options...]
#
# CPU-only unless MISS_EXT_CMAKE_CUDA=1 (CUDA kernels, archs from TORCH_CUDA_ARCH_LIST or
# 8.0;9.0): the CUDA variant is the same .cu files setup.py already compiles, and nvcc on two
# cores would add several minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="${1:-build/cmake}"
shift || true
python=$(command -v python)
prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cuda=OFF
[ "${MISS_EXT_CMAKE_CUDA:-0}" = 1 ] && cuda=ON

start=$SECONDS
cmake -S . -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DMISS_EXT_WITH_CUDA="$cuda" -DMISS_EXT_PYTHON="$python" \
  -DMISS_EXT_BUILD_TESTS=ON "$@"
cmake --build "$build" -j "${MAX_JOBS:-2}"
echo "cmake: configure + build took $((SECONDS - start)) s"
(cd "$build" && ctest --output-on-failure)
echo "cmake: total $((SECONDS - start)) s; library: $build/libmiss_ext.so"
