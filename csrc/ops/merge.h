// miss::merge / miss::merge_: W <- W + tile(block)^T (reverse: minus), default and mini modes.
//   dW[o, i] = block[i mod r, o mod mini_r]; columns past a multiple of r get the first
//   in mod r block rows, and r > in uses only the first `in` rows.
#pragma once

#include <ATen/core/Tensor.h>

namespace miss_ext {
namespace ops {

at::Tensor merge(const at::Tensor& weight, const at::Tensor& block, bool reverse = false);
void merge_(at::Tensor& weight, const at::Tensor& block, bool reverse = false);

}  // namespace ops

// Backend kernels registered at CPU and CUDA; both run miss::tile_add_ on the weight.
at::Tensor merge_kernel(const at::Tensor& weight, const at::Tensor& block, bool reverse);
void merge_inplace_kernel(at::Tensor& weight, const at::Tensor& block, bool reverse);

// d(merged W)/d(block) applied to a weight-shaped gradient: the gradient folded along in (period
// r) and along out (period mini_r), negated for reverse.
at::Tensor merge_block_grad(const at::Tensor& grad_weight, const at::Tensor& block, bool reverse);

}  // namespace miss_ext
