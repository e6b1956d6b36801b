// C++ API of the miss op library: each function calls its op through the dispatcher, so
// autograd and every compiled backend apply. Link against the library (see CMakeLists.txt).
#pragma once

#include "ops/fold.h"
#include "ops/linear.h"
#include "ops/merge.h"
