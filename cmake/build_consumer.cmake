# cmake -P script behind the `consumer_build` ctest: configures and builds examples/cpp as an
# independent project that finds the installed library with find_package(miss_ext).
# Arguments: SOURCE_DIR, BINARY_DIR, PREFIX_PATH ('|'-separated), GENERATOR, BUILD_TYPE,
# CUDA_ARCHS ('|'-separated like PREFIX_PATH: a ';' list would be split into separate arguments by
# add_test; passed on so the consumer's torch config needs no GPU to pick them).
string(REPLACE "|" ";" _prefix_path "${PREFIX_PATH}")
string(REPLACE "|" ";" _cuda_archs "${CUDA_ARCHS}")
file(REMOVE_RECURSE "${BINARY_DIR}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
          "-DCMAKE_PREFIX_PATH=${_prefix_path}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
          "-DTORCH_CUDA_ARCH_LIST=${_cuda_archs}"
  RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "configuring the consumer project failed (${_rc})")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "building the consumer project failed (${_rc})")
endif()
