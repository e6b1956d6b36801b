# Can ctest's Python step run here? It needs an interpreter that imports the torch this library
# is built against and a setup.py-built miss_ext (it writes the TorchScript/AOTInductor files).
#
# MISS_EXT_PYTHON (cache): the interpreter; default the Python CMake finds (an active venv first).
# MISS_PYTHON_ENV: environment for it. When the source tree holds an in-place build of miss_ext
#   (miss_ext/_C*.so: setup.py build_ext --inplace or pip install -e), the source dir goes first
#   on PYTHONPATH, so the step uses this checkout's extension rather than another install.
# MISS_PYTHON_OK / MISS_PYTHON_PROBLEM: the verdict and, when false, why.
find_package(Python3 COMPONENTS Interpreter QUIET)
set(MISS_EXT_PYTHON "${Python3_EXECUTABLE}" CACHE FILEPATH "Python with torch and miss_ext, for the ctest fixture")

file(GLOB _miss_inplace "${PROJECT_SOURCE_DIR}/miss_ext/_C*.so")
set(MISS_PYTHON_ENV "")
if(_miss_inplace)
  set(MISS_PYTHON_ENV "PYTHONPATH=${PROJECT_SOURCE_DIR}")
endif()

set(MISS_PYTHON_OK FALSE)
if(NOT MISS_EXT_PYTHON)
  set(MISS_PYTHON_PROBLEM "no Python interpreter found")
else()
  # Run in the build folder: `python -c` puts its working directory first on sys.path, and from
  # the source root (the README's `cmake -S .`) it imported the unbuilt miss_ext/ there instead of
  # the installed one, turning the checks off (a new-user pass, 2026-12-05). The environment is
  # set here, not through `cmake -E env`, which reads an interpreter path holding '=' (a venv under
  # a folder named torch==2.15.0) as a variable to set.
  set(_miss_saved_pythonpath "$ENV{PYTHONPATH}")
  if(_miss_inplace)
    set(ENV{PYTHONPATH} "${PROJECT_SOURCE_DIR}")
  endif()
  execute_process(
    COMMAND "${MISS_EXT_PYTHON}" -c "import torch, miss_ext; print(torch.__version__.split('+')[0])"
    WORKING_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}"
    OUTPUT_VARIABLE _miss_py_torch OUTPUT_STRIP_TRAILING_WHITESPACE
    ERROR_VARIABLE _miss_py_err RESULT_VARIABLE _miss_py_rc)
  set(ENV{PYTHONPATH} "${_miss_saved_pythonpath}")
  if(NOT _miss_py_rc EQUAL 0)
    string(REGEX REPLACE ".*\n([^\n]+)\n?$" "\\1" _miss_py_err "${_miss_py_err}")  # the last line
    set(MISS_PYTHON_PROBLEM "${MISS_EXT_PYTHON} cannot import torch and miss_ext: ${_miss_py_err}")
  elseif(NOT _miss_py_torch VERSION_EQUAL Torch_VERSION)
    set(MISS_PYTHON_PROBLEM "${MISS_EXT_PYTHON} has torch ${_miss_py_torch}, the library is built against ${Torch_VERSION}")
  else()
    set(MISS_PYTHON_OK TRUE)
  endif()
endif()
