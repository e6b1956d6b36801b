// Registers every miss op for one backend, given that backend's kernels. The op wrappers
// (validation, shaping, allocation) and the linear/merge compositions are device-generic, so
// CPU and CUDA differ only in the kernels passed here.
#pragma once

#include <torch/library.h>

#include "bank.h"
#include "bank_fold.h"
#include "bat.h"
#include "fold.h"
#include "linear.h"
#include "merge.h"
#include "split_gemm.h"

namespace miss_ext {

template <FoldKernel kernel>
at::Tensor fold_on(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key,
                   std::optional<at::ScalarType> dtype) {
  return fold_with(kernel, x, r, p, key, dtype);
}

template <TileAddKernel kernel>
void tile_add_on(at::Tensor& out, const at::Tensor& src, double alpha, double p, const std::optional<at::Tensor>& key) {
  tile_add_with(kernel, out, src, alpha, p, key);
}

template <BatKernel kernel>
at::Tensor bat_transform_on(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                            std::optional<at::ScalarType> dtype, bool residual) {
  return bat_transform_with(kernel, w, m, p, dtype, residual);
}

template <BatKernel kernel>
void bat_transform_inplace_on(at::Tensor& w, const at::Tensor& m, const at::Tensor& p, bool residual) {
  bat_transform_inplace_with(kernel, w, m, p, residual);
}

template <BankAddKernel kernel>
void bank_add_on(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                 const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  bank_add_with(kernel, y, s, bank, ranks, periods, index, per_row_fold);
}

template <BankGradKernel kernel>
std::tuple<at::Tensor, at::Tensor> bank_add_backward_on(const at::Tensor& grad, const at::Tensor& s,
                                                        const at::Tensor& bank, const at::Tensor& ranks,
                                                        const at::Tensor& periods, const at::Tensor& index,
                                                        bool per_row_fold) {
  return bank_add_backward_with(kernel, grad, s, bank, ranks, periods, index, per_row_fold);
}

template <BankFoldKernel kernel>
at::Tensor bank_fold_on(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                        const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key,
                        std::optional<at::ScalarType> dtype) {
  return bank_fold_with(kernel, x, index, ranks, max_r, dropouts, key, dtype);
}

template <BankFoldGradKernel kernel>
at::Tensor bank_fold_backward_on(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                                 c10::SymInt in_features, const std::optional<at::Tensor>& dropouts,
                                 const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
  return bank_fold_backward_with(kernel, grad, index, ranks, std::move(in_features), dropouts, key, dtype);
}

template <SplitBf16Kernel kernel>
at::Tensor split_bf16_on(const at::Tensor& t, int64_t parts, at::IntArrayRef order, int64_t dim) {
  return split_bf16_with(kernel, t, parts, order, dim);
}

// The kernels of one backend. A struct of function pointers would not be a template argument, so
// they are listed one by one.
template <FoldKernel fold_kernel, TileAddKernel tile_add_kernel, BatKernel bat_kernel, BankAddKernel bank_add_kernel,
          BankGradKernel bank_grad_kernel, BankFoldKernel bank_fold_kernel, BankFoldGradKernel bank_fold_grad_kernel,
          SplitBf16Kernel split_bf16_kernel>
void register_backend(torch::Library& m) {
  m.impl("bank_add", &bank_add_functional_kernel);
  m.impl("bank_add_", &bank_add_on<bank_add_kernel>);
  m.impl("bank_add_backward", &bank_add_backward_on<bank_grad_kernel>);
  m.impl("bank_fold", &bank_fold_on<bank_fold_kernel>);
  m.impl("bank_fold_backward", &bank_fold_backward_on<bank_fold_grad_kernel>);
  m.impl("fold", &fold_on<fold_kernel>);
  m.impl("tile_add_", &tile_add_on<tile_add_kernel>);
  m.impl("tile_add", &tile_add_functional_kernel);
  m.impl("linear", &linear_kernel);
  m.impl("merge", &merge_kernel);
  m.impl("merge_", &merge_inplace_kernel);
  m.impl("bat_transform", &bat_transform_on<bat_kernel>);
  m.impl("bat_transform_", &bat_transform_inplace_on<bat_kernel>);
  m.impl("bat_weight", &bat_weight_kernel);
  m.impl("bat_linear", &bat_linear_kernel);
  m.impl("split_addmm", &split_addmm_kernel);
  m.impl("split_addmm_", &split_addmm_inplace_kernel);
  m.impl("split_bf16", &split_bf16_on<split_bf16_kernel>);
}

}  // namespace miss_ext
