# ctest checks (MISS_EXT_BUILD_TESTS):
#   python_models     fixture: make_torchscript.py writes the TorchScript model and Python's
#                     outputs/gradients, using the setup.py-built miss_ext (a separate process)
#   serve_torchscript the in-tree C++ example against them
#   install           fixture: cmake --install into <build>/test-install
#   consumer_build    fixture: examples/cpp configured and built on its own with
#                     find_package(miss_ext) against that install (headers, package config)
#   consumer_run      the installed-library build of the example against the same files
#
# MISS_EXT_PYTHON is the interpreter for the fixture; it must import the torch this library is
# built against and miss_ext. When the source tree holds an in-place build of miss_ext
# (miss_ext/_C*.so, from setup.py build_ext --inplace or pip install -e), that copy is put first
# on PYTHONPATH, so the fixture uses this checkout's extension rather than another install.
find_package(Python3 COMPONENTS Interpreter)
set(MISS_EXT_PYTHON "${Python3_EXECUTABLE}" CACHE FILEPATH "Python with torch and miss_ext, for the ctest fixture")

file(GLOB _miss_inplace "${PROJECT_SOURCE_DIR}/miss_ext/_C*.so")
set(_miss_py_env "")
if(_miss_inplace)
  set(_miss_py_env "PYTHONPATH=${PROJECT_SOURCE_DIR}")
endif()
execute_process(
  COMMAND ${CMAKE_COMMAND} -E env ${_miss_py_env} "${MISS_EXT_PYTHON}" -c
          "import torch, miss_ext; print(torch.__version__.split('+')[0])"
  OUTPUT_VARIABLE _miss_py_torch OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_VARIABLE _miss_py_err RESULT_VARIABLE _miss_py_rc)
if(NOT _miss_py_rc EQUAL 0 OR NOT _miss_py_torch VERSION_EQUAL Torch_VERSION)
  message(FATAL_ERROR "MISS_EXT_BUILD_TESTS needs a Python that imports torch ${Torch_VERSION} and miss_ext "
                      "(build it with setup.py first); ${MISS_EXT_PYTHON} gave: ${_miss_py_torch} ${_miss_py_err}\n"
                      "Set -DMISS_EXT_PYTHON=<python> or -DMISS_EXT_BUILD_TESTS=OFF.")
endif()

set(_models "${CMAKE_CURRENT_BINARY_DIR}/test-models")
add_test(NAME python_models
  COMMAND ${CMAKE_COMMAND} -E env ${_miss_py_env}
          "${MISS_EXT_PYTHON}" "${PROJECT_SOURCE_DIR}/examples/cpp/make_torchscript.py" "${_models}")
set_tests_properties(python_models PROPERTIES FIXTURES_SETUP models TIMEOUT 300)

add_test(NAME serve_torchscript COMMAND serve_torchscript "${_models}/miss_model.pt" "${_models}/miss_expected.pt")
set_tests_properties(serve_torchscript PROPERTIES FIXTURES_REQUIRED models TIMEOUT 300)

set(_prefix "${CMAKE_CURRENT_BINARY_DIR}/test-install")
set(_consumer "${CMAKE_CURRENT_BINARY_DIR}/test-consumer")
add_test(NAME install COMMAND ${CMAKE_COMMAND} --install "${CMAKE_CURRENT_BINARY_DIR}" --prefix "${_prefix}")
set_tests_properties(install PROPERTIES FIXTURES_SETUP installed)

# Only the install prefix and torch's CMake dir: everything else must come from the package.
add_test(NAME consumer_build
  COMMAND ${CMAKE_COMMAND}
          -DSOURCE_DIR=${PROJECT_SOURCE_DIR}/examples/cpp -DBINARY_DIR=${_consumer}
          "-DPREFIX_PATH=${_prefix}|${Torch_DIR}/.." -DGENERATOR=${CMAKE_GENERATOR}
          -DBUILD_TYPE=${CMAKE_BUILD_TYPE} -DCUDA_ARCHS=${TORCH_CUDA_ARCH_LIST}
          -P "${PROJECT_SOURCE_DIR}/cmake/build_consumer.cmake")
set_tests_properties(consumer_build PROPERTIES FIXTURES_REQUIRED installed FIXTURES_SETUP consumer TIMEOUT 1200)

add_test(NAME consumer_run
  COMMAND "${_consumer}/serve_torchscript" "${_models}/miss_model.pt" "${_models}/miss_expected.pt")
set_tests_properties(consumer_run PROPERTIES FIXTURES_REQUIRED "consumer;models" TIMEOUT 300)
