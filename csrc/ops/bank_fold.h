// miss::bank_fold and bank_fold_backward: the fold of a mixed-adapter batch, each row at the rank
// and dropout rate of its own adapter (the math is in torch_bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels.h"

namespace miss_ext {
namespace ops {

// C++ API: calls through the dispatcher, so autograd, tracing and every backend apply.
at::Tensor bank_fold(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                     const std::optional<at::Tensor>& dropouts = std::nullopt,
                     const std::optional<at::Tensor>& key = std::nullopt,
                     std::optional<at::ScalarType> dtype = std::nullopt);
at::Tensor bank_fold_backward(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                              c10::SymInt in_features, const std::optional<at::Tensor>& dropouts = std::nullopt,
                              const std::optional<at::Tensor>& key = std::nullopt,
                              std::optional<at::ScalarType> dtype = std::nullopt);

}  // namespace ops

// Backend wrappers: validate, flatten to 2-D, make contiguous, allocate, then run the kernel.
at::Tensor bank_fold_with(BankFoldKernel kernel, const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks,
                          int64_t max_r, const std::optional<at::Tensor>& dropouts,
                          const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype);
at::Tensor bank_fold_backward_with(BankFoldGradKernel kernel, const at::Tensor& grad, const at::Tensor& index,
                                   const at::Tensor& ranks, c10::SymInt in_features,
                                   const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key,
                                   std::optional<at::ScalarType> dtype);

}  // namespace miss_ext
