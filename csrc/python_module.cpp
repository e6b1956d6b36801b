// The Python extension module `miss_ext._C`. Importing it loads this shared library, whose
// static initialisers register the `miss` ops with the dispatcher; the module itself is empty.
// Only the setup.py build compiles this file (the CMake library has no Python dependency).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "miss_ext op library", -1, nullptr};
  return PyModule_Create(&module_def);
}
