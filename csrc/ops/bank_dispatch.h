// The dtype dispatch of the adapter-bank kernels, shared by the CPU and CUDA backends.
#pragma once

#include <ATen/Dispatch.h>

namespace miss_ext {

// Calls f(y_t(), a_t()) for the (data, adapter) dtype pair of a bank call: a_t, the dtype of s
// and the bank, is the data's dtype or float (check_bank_args enforces it), so each kernel is
// instantiated for few pairs.
template <typename F>
void dispatch_bank(at::ScalarType data, at::ScalarType adapter, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, data, "miss_bank", [&] {
    if (adapter == data) {
      f(scalar_t(), scalar_t());
    } else {
      f(scalar_t(), float());
    }
  });
}

}  // namespace miss_ext
