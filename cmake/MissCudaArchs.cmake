# The CUDA architectures, as torch's CMake config wants them: it reads TORCH_CUDA_ARCH_LIST
# (CMake variable or environment) and ignores CMAKE_CUDA_ARCHITECTURES (it warns and turns it
# off). So a CMAKE_CUDA_ARCHITECTURES given on the command line (80;90) is translated to
# TORCH_CUDA_ARCH_LIST (8.0;9.0). With neither, the default is 8.0;9.0 (A100, H100/H200), as in
# setup.py: torch's own default would probe a GPU, and build machines often have none.
# Include before find_package(Torch).
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND DEFINED ENV{TORCH_CUDA_ARCH_LIST}
   AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
endif()
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND CMAKE_CUDA_ARCHITECTURES)
  set(TORCH_CUDA_ARCH_LIST "")
  foreach(_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
    # 90 -> 9.0, 100a -> 10.0a, 90-real -> 9.0 (torch's list has no -real/-virtual suffixes)
    string(REGEX REPLACE "-(real|virtual)$" "" _arch "${_arch}")
    string(REGEX REPLACE "^([0-9]+)([0-9])([a-z]?)$" "\\1.\\2\\3" _arch "${_arch}")
    list(APPEND TORCH_CUDA_ARCH_LIST "${_arch}")
  endforeach()
endif()
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
string(REPLACE " " ";" TORCH_CUDA_ARCH_LIST "${TORCH_CUDA_ARCH_LIST}")
