# cmake -P script behind the `consumer_build` ctest: configures and builds examples/cpp as an
# independent project that finds the installed library with find_package(miss_ext).
# Arguments: SOURCE_DIR, BINARY_DIR, PREFIX_PATH ('|'-separated), GENERATOR, BUILD_TYPE,
# CUDA_ARCHS (';'-list, passed on so the consumer's torch config needs no GPU to pick them).
string(REPLACE "|" ";" _prefix_path "${PREFIX_PATH}")
file(REMOVE_RECURSE "${BINARY_DIR}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
          "-DCMAKE_PREFIX_PATH=${_prefix_path}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
          "-DTORCH_CUDA_ARCH_LIST=${CUDA_ARCHS}"
  RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "configuring the consumer project failed (${_rc})")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "building the consumer project failed (${_rc})")
endif()
