// C++ API of the miss op library: the functions in namespace miss_ext::ops. Each calls its op
// through the dispatcher, so argument checks, autograd and every backend apply. Link against the
// library: CMake target miss_ext::miss_ext (see CMakeLists.txt and examples/cpp/).
//
// The other declarations these headers bring in (namespace miss_ext: linear_forward,
// linear_backward, the *_kernel and *_with functions, ...) are the ops' implementation, shared by
// their kernels and C++ autograd. They assume arguments the op has already checked (a wrong shape
// can give a wrong-shaped result instead of an error) and may change without notice: call them
// only through miss_ext::ops.
#pragma once

#include "ops/fold.h"
#include "ops/linear.h"
#include "ops/merge.h"
#include "ops/bat.h"
#include "ops/bank.h"
#include "ops/bank_fold.h"
