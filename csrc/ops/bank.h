// miss::bank_add, bank_add_ and bank_add_backward: a bank of MiSS adapters applied one adapter per
// row (mixed-adapter batches). The math is in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "kernels.h"

namespace miss_ext {
namespace ops {

// C++ API: calls through the dispatcher, so autograd, tracing and every backend apply.
at::Tensor bank_add(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                    const at::Tensor& periods, const at::Tensor& index, bool per_row_fold = false);
void bank_add_(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
               const at::Tensor& periods, const at::Tensor& index, bool per_row_fold = false);
std::tuple<at::Tensor, at::Tensor> bank_add_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank,
                                                     const at::Tensor& ranks, const at::Tensor& periods,
                                                     const at::Tensor& index, bool per_row_fold = false);

}  // namespace ops

// The functional bank_add, device-generic: a contiguous copy of y, then miss::bank_add_ on it.
at::Tensor bank_add_functional_kernel(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank,
                                      const at::Tensor& ranks, const at::Tensor& periods, const at::Tensor& index,
                                      bool per_row_fold);

// Backend wrappers: validate, flatten to 2-D, make contiguous, allocate, then run the kernel.
void bank_add_with(BankAddKernel kernel, at::Tensor& y, const at::Tensor& s, const at::Tensor& bank,
                   const at::Tensor& ranks, const at::Tensor& periods, const at::Tensor& index, bool per_row_fold);
std::tuple<at::Tensor, at::Tensor> bank_add_backward_with(BankGradKernel kernel, const at::Tensor& grad,
                                                          const at::Tensor& s, const at::Tensor& bank,
                                                          const at::Tensor& ranks, const at::Tensor& periods,
                                                          const at::Tensor& index, bool per_row_fold);

}  // namespace miss_ext
