# Points CMake and torch's CMake config at the real CUDA toolkit, before find_package(Torch).
#
# Why: a CUDA build of torch runs its public/cuda.cmake inside find_package(Torch) (even for a
# CPU-only build of this library), and that file finds the toolkit through FindCUDA, which takes
# the root as dirname(nvcc)/..: wrong when `nvcc` on PATH is a wrapper script
# (/usr/local/bin/nvcc -> root /usr/local). The real root is read from `nvcc -dryrun`
# (`#$ TOP=<root>/bin/..`), the same rule as setup.py.
#
# Hints, first match wins: -DCUDAToolkit_ROOT=<root> (or the env var), CUDA_HOME / CUDA_PATH
# (env), -DCMAKE_CUDA_COMPILER=<nvcc> or CUDACXX (env), nvcc on PATH, /usr/local/cuda.
# Result: MISS_CUDA_TOOLKIT_ROOT (empty when none was found), and CUDAToolkit_ROOT,
# CUDA_TOOLKIT_ROOT_DIR and CMAKE_CUDA_COMPILER set to match it unless the caller set them.

function(miss_toolkit_root_from_nvcc nvcc out_var)
  execute_process(
    COMMAND "${nvcc}" -dryrun -x cu -c /dev/null -o /dev/null
    OUTPUT_VARIABLE _out ERROR_VARIABLE _err RESULT_VARIABLE _rc TIMEOUT 60)
  set(_root "")
  if("${_out}\n${_err}" MATCHES "#\\$ TOP=([^\r\n]+)")
    get_filename_component(_root "${CMAKE_MATCH_1}" REALPATH)
  else()
    get_filename_component(_nvcc_real "${nvcc}" REALPATH)
    get_filename_component(_root "${_nvcc_real}/../.." REALPATH)
  endif()
  set(${out_var} "${_root}" PARENT_SCOPE)
endfunction()

function(miss_is_toolkit root out_var)
  if(root AND EXISTS "${root}/bin/nvcc" AND EXISTS "${root}/include/cuda_runtime.h")
    set(${out_var} TRUE PARENT_SCOPE)
  else()
    set(${out_var} FALSE PARENT_SCOPE)
  endif()
endfunction()

set(MISS_CUDA_TOOLKIT_ROOT "")
set(_candidates "")
if(CUDAToolkit_ROOT)
  list(APPEND _candidates "root:${CUDAToolkit_ROOT}")
endif()
foreach(_var CUDAToolkit_ROOT CUDA_HOME CUDA_PATH)
  if(DEFINED ENV{${_var}} AND NOT "$ENV{${_var}}" STREQUAL "")
    list(APPEND _candidates "root:$ENV{${_var}}")
  endif()
endforeach()
if(CMAKE_CUDA_COMPILER)
  list(APPEND _candidates "nvcc:${CMAKE_CUDA_COMPILER}")
endif()
if(DEFINED ENV{CUDACXX} AND NOT "$ENV{CUDACXX}" STREQUAL "")
  list(APPEND _candidates "nvcc:$ENV{CUDACXX}")
endif()
find_program(MISS_NVCC_ON_PATH nvcc)
if(MISS_NVCC_ON_PATH)
  list(APPEND _candidates "nvcc:${MISS_NVCC_ON_PATH}")
endif()
list(APPEND _candidates "root:/usr/local/cuda")

foreach(_candidate IN LISTS _candidates)
  string(REGEX REPLACE "^([a-z]+):(.*)$" "\\1" _kind "${_candidate}")
  string(REGEX REPLACE "^([a-z]+):(.*)$" "\\2" _value "${_candidate}")
  if(_kind STREQUAL "nvcc")
    miss_toolkit_root_from_nvcc("${_value}" _root)
  else()
    get_filename_component(_root "${_value}" REALPATH)
  endif()
  miss_is_toolkit("${_root}" _ok)
  if(_ok)
    set(MISS_CUDA_TOOLKIT_ROOT "${_root}")
    set(_found_from "${_kind} ${_value}")
    break()
  elseif(NOT _value STREQUAL "/usr/local/cuda")  # an explicit hint that is wrong: say so
    message(WARNING "miss_ext: ignoring CUDA hint ${_kind} '${_value}': no bin/nvcc and include/cuda_runtime.h under '${_root}'")
  endif()
endforeach()

if(MISS_CUDA_TOOLKIT_ROOT)
  message(STATUS "miss_ext: CUDA toolkit at ${MISS_CUDA_TOOLKIT_ROOT} (from ${_found_from})")
  if(NOT CUDAToolkit_ROOT)
    set(CUDAToolkit_ROOT "${MISS_CUDA_TOOLKIT_ROOT}")
  endif()
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    set(CUDA_TOOLKIT_ROOT_DIR "${MISS_CUDA_TOOLKIT_ROOT}" CACHE PATH "CUDA toolkit root (FindCUDA, used by torch)")
  endif()
  if(NOT CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_COMPILER "${MISS_CUDA_TOOLKIT_ROOT}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
  endif()
else()
  message(STATUS "miss_ext: no CUDA toolkit found (hints: -DCUDAToolkit_ROOT=<root>, CUDA_HOME, CUDACXX)")
endif()
# Included by the package config in a consumer's scope too: leave only the documented results.
unset(_candidates)
unset(_candidate)
unset(_var)
unset(_kind)
unset(_value)
unset(_root)
unset(_ok)
unset(_found_from)
