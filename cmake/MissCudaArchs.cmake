# The CUDA architectures, as torch's CMake config wants them: it reads TORCH_CUDA_ARCH_LIST
# (CMake variable or environment) and ignores CMAKE_CUDA_ARCHITECTURES (it warns and turns it
# off). So a CMAKE_CUDA_ARCHITECTURES given on the command line (80;90) is translated to
# TORCH_CUDA_ARCH_LIST (8.0;9.0). With neither, the default is 8.0;9.0 (A100, H100/H200), as in
# setup.py: torch's own default would probe a GPU, and build machines often have none.
# Include before find_package(Torch); call miss_record_cmake_cuda_default() after it and after
# enable_language(CUDA).
#
# CMake caches its compiler's default (75 for nvcc 13) in CMAKE_CUDA_ARCHITECTURES the first time
# CUDA is enabled (a CUDA torch's find_package does it); a later configure of the same build folder
# read that value as the user's choice and built sm_75 code only (a new-user pass, 2026-12-05). The
# value CMake cached by itself is recorded (MISS_CUDA_ARCHITECTURES_CMAKE_DEFAULT) and not taken for
# a choice; CMake's CUDAARCHS environment variable (which seeds that cache entry) is one. A -D equal
# to the recorded value cannot be told from it: a message says so (give TORCH_CUDA_ARCH_LIST then).
set(_miss_cuda_archs_before "${CMAKE_CUDA_ARCHITECTURES}")
set(_miss_cmake_archs "${CMAKE_CUDA_ARCHITECTURES}")
if("${_miss_cmake_archs}" STREQUAL "" AND NOT "$ENV{CUDAARCHS}" STREQUAL "")
  set(_miss_cmake_archs "$ENV{CUDAARCHS}")
elseif(DEFINED CACHE{MISS_CUDA_ARCHITECTURES_CMAKE_DEFAULT}
       AND "${CMAKE_CUDA_ARCHITECTURES}" STREQUAL "$CACHE{MISS_CUDA_ARCHITECTURES_CMAKE_DEFAULT}")
  set(_miss_cmake_archs "")
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    message(STATUS "miss_ext: CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES} is what CMake cached by itself "
                   "on the first configure, not taken as a choice; to build for it, give TORCH_CUDA_ARCH_LIST")
  endif()
endif()
function(miss_record_cmake_cuda_default)
  if("${_miss_cuda_archs_before}" STREQUAL "" AND "$ENV{CUDAARCHS}" STREQUAL ""
     AND NOT "$CACHE{CMAKE_CUDA_ARCHITECTURES}" STREQUAL "" AND NOT DEFINED CACHE{MISS_CUDA_ARCHITECTURES_CMAKE_DEFAULT})
    set(MISS_CUDA_ARCHITECTURES_CMAKE_DEFAULT "$CACHE{CMAKE_CUDA_ARCHITECTURES}" CACHE INTERNAL
        "CMAKE_CUDA_ARCHITECTURES as CMake cached it by itself (not a choice: cmake/MissCudaArchs.cmake)")
  endif()
endfunction()
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND DEFINED ENV{TORCH_CUDA_ARCH_LIST}
   AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
endif()
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND _miss_cmake_archs)
  # CMake's special values have torch counterparts: native -> Auto (torch probes the visible GPUs,
  # and builds its common list when there are none), all -> All, all-major -> All (a superset:
  # torch has no major-only list). Passed through unchanged, torch's config stops with "Unknown
  # CUDA Architecture Name".
  if(_miss_cmake_archs STREQUAL "native")
    set(TORCH_CUDA_ARCH_LIST "Auto")
  elseif(_miss_cmake_archs MATCHES "^all(-major)?$")
    set(TORCH_CUDA_ARCH_LIST "All")
  else()
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_miss_arch IN LISTS _miss_cmake_archs)
      # 90 -> 9.0, 100a -> 10.0a, 90-real -> 9.0, 90-virtual -> 9.0+PTX (torch's +PTX also keeps
      # the machine code: a superset of PTX only; dropping -virtual would give machine code only)
      if(NOT _miss_arch MATCHES "^([0-9]+)([0-9])([a-z]?)(-real|-virtual)?$")
        message(FATAL_ERROR "CMAKE_CUDA_ARCHITECTURES entry '${_miss_arch}' is not understood here "
                            "(expected e.g. 80, 90a, 90-real, 90-virtual, native, all); "
                            "or set TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0\") instead")
      endif()
      set(_miss_torch_arch "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      if(CMAKE_MATCH_4 STREQUAL "-virtual")
        string(APPEND _miss_torch_arch "+PTX")
      endif()
      list(APPEND TORCH_CUDA_ARCH_LIST "${_miss_torch_arch}")
    endforeach()
    unset(_miss_arch)
    unset(_miss_torch_arch)
  endif()
endif()
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
string(REPLACE " " ";" TORCH_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
