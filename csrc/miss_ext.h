// C++ API of the miss op library: each function calls its op through the dispatcher, so
// autograd and every compiled backend apply. Link against the library: CMake target
// miss_ext::miss_ext (see CMakeLists.txt and examples/cpp/).
#pragma once

#include "ops/fold.h"
#include "ops/linear.h"
#include "ops/merge.h"
#include "ops/bat.h"
#include "ops/bank.h"
#include "ops/bank_fold.h"
