# ctest checks (MISS_EXT_BUILD_TESTS):
#   python_models     fixture: make_models.py writes the TorchScript model, its AOTInductor
#                     package and Python's outputs/gradients, using the setup.py-built miss_ext
#                     (a separate process)
#   serve_torchscript, serve_aoti
#                     the in-tree C++ examples against them
#   serve_missing_file
#                     an example given a file that does not exist prints the error and exits (an
#                     abort through std::terminate before; a C++ review, 2026-12-06)
#   install           fixture: cmake --install into <build>/test-install
#   consumer_build    fixture: examples/cpp configured and built on its own with
#                     find_package(miss_ext) against that install (headers, package config)
#   consumer_run, consumer_run_aoti
#                     the installed-library builds of the examples against the same files
#
# The Python fixture runs ${MISS_EXT_PYTHON} with ${MISS_PYTHON_ENV} (cmake/MissPythonProbe.cmake).
#
# AOTInductor needs torch 2.12+: up to 2.11 its package runtime hands custom ops wrong dtype
# arguments (pytorch/pytorch#169157), and miss_ext refuses to compile such packages there
# (miss_ext/_aoti_guard.py). On older torch the AOTInductor fixture and tests are left out.
set(_models "${CMAKE_CURRENT_BINARY_DIR}/test-models")
set(_aoti_args "")
set(MISS_EXT_TEST_AOTI ON)
if(Torch_VERSION VERSION_LESS 2.12)
  set(MISS_EXT_TEST_AOTI OFF)
  set(_aoti_args "--no-aoti")
  message(STATUS "miss_ext: torch ${Torch_VERSION} < 2.12: the AOTInductor tests are left out (pytorch/pytorch#169157)")
endif()
add_test(NAME python_models
  COMMAND "${MISS_EXT_PYTHON}" "${PROJECT_SOURCE_DIR}/examples/cpp/make_models.py" "${_models}" ${_aoti_args})
# AOTInductor compiles the package with the host C++ compiler: about a minute on two cores. The
# environment as a test property (`cmake -E env` read an interpreter path holding '=' as a variable).
set_tests_properties(python_models PROPERTIES FIXTURES_SETUP models TIMEOUT 900 ENVIRONMENT "${MISS_PYTHON_ENV}")

add_test(NAME serve_torchscript COMMAND serve_torchscript "${_models}/miss_model.pt" "${_models}/miss_expected.pt")
set_tests_properties(serve_torchscript PROPERTIES FIXTURES_REQUIRED models TIMEOUT 300)

# The message line is run_main's ("<program>: <error>"): an abort prints "terminate called" instead.
add_test(NAME serve_missing_file COMMAND serve_torchscript "${_models}/no_such_model.pt" "${_models}/no_such.pt")
set_tests_properties(serve_missing_file PROPERTIES TIMEOUT 120
  PASS_REGULAR_EXPRESSION "serve_torchscript: [^\n]*no_such_model[.]pt")

if(MISS_EXT_TEST_AOTI)
  add_test(NAME serve_aoti COMMAND serve_aoti "${_models}/miss_model.pt2" "${_models}/miss_expected.pt")
  set_tests_properties(serve_aoti PROPERTIES FIXTURES_REQUIRED models TIMEOUT 300)
endif()

set(_prefix "${CMAKE_CURRENT_BINARY_DIR}/test-install")
set(_consumer "${CMAKE_CURRENT_BINARY_DIR}/test-consumer")
add_test(NAME install COMMAND ${CMAKE_COMMAND} --install "${CMAKE_CURRENT_BINARY_DIR}" --prefix "${_prefix}")
set_tests_properties(install PROPERTIES FIXTURES_SETUP installed)

# Only the install prefix and torch's CMake dir: everything else must come from the package.
string(REPLACE ";" "|" _consumer_archs "${TORCH_CUDA_ARCH_LIST}")
add_test(NAME consumer_build
  COMMAND ${CMAKE_COMMAND}
          -DSOURCE_DIR=${PROJECT_SOURCE_DIR}/examples/cpp -DBINARY_DIR=${_consumer}
          "-DPREFIX_PATH=${_prefix}|${Torch_DIR}/.." -DGENERATOR=${CMAKE_GENERATOR}
          -DBUILD_TYPE=${CMAKE_BUILD_TYPE} "-DCUDA_ARCHS=${_consumer_archs}"
          -P "${PROJECT_SOURCE_DIR}/cmake/build_consumer.cmake")
set_tests_properties(consumer_build PROPERTIES FIXTURES_REQUIRED installed FIXTURES_SETUP consumer TIMEOUT 1200)

add_test(NAME consumer_run
  COMMAND "${_consumer}/serve_torchscript" "${_models}/miss_model.pt" "${_models}/miss_expected.pt")
set_tests_properties(consumer_run PROPERTIES FIXTURES_REQUIRED "consumer;models" TIMEOUT 300)

if(MISS_EXT_TEST_AOTI)
  add_test(NAME consumer_run_aoti
    COMMAND "${_consumer}/serve_aoti" "${_models}/miss_model.pt2" "${_models}/miss_expected.pt")
  set_tests_properties(consumer_run_aoti PROPERTIES FIXTURES_REQUIRED "consumer;models" TIMEOUT 300)
endif()
