// Bat (block-affine) MiSS: W' = W + W_ij B_i + B_i for r x r tiles W_ij of W (out, in) and the
// block B (out/r, r, r); y = x W'^T + b. Index math in common/bat_index.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "kernels.h"

namespace miss_ext {
namespace ops {

// C++ API (dispatcher calls).
at::Tensor bat_transform(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                         std::optional<at::ScalarType> dtype = std::nullopt, bool residual = false);
void bat_transform_(at::Tensor& w, const at::Tensor& m, const at::Tensor& p, bool residual = false);
at::Tensor bat_weight(const at::Tensor& weight, const at::Tensor& block,
                      std::optional<at::ScalarType> dtype = std::nullopt);
at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& block, std::optional<at::ScalarType> compute_dtype = std::nullopt);

}  // namespace ops

// Backend wrappers of bat_transform / bat_transform_ around one backend's kernel.
at::Tensor bat_transform_with(BatKernel kernel, const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                              std::optional<at::ScalarType> dtype, bool residual);
void bat_transform_inplace_with(BatKernel kernel, at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                                bool residual);

// Float64 when the weight or the block is float64, else float32: the dtype of M, P and of the
// kernels' accumulation.
at::ScalarType bat_compute_dtype(const at::Tensor& weight, const at::Tensor& block);

// (M, P, residual) of the bat transform (common/bat_index.h): merge and forward M = P = B in the
// residual form (W + (W B + B)); unmerge M = (I+B)^-1, P = -B (I+B)^-1 from a batched float64
// solve, after checking every I + B_i is well conditioned for a weight of `weight_dtype`
// (bat_max_condition; ValueError naming the block and its condition number otherwise). M and P in
// `dtype`.
struct BatAffine {
  at::Tensor m, p;
  bool residual;
};
BatAffine bat_affine(const at::Tensor& block, bool reverse, at::ScalarType dtype, at::ScalarType weight_dtype);

// Largest accepted condition number of I + B_i, and of ||B_i|| ||(I + B_i)^-1||, for unmerge. The
// restored weight's error is about u * (cond |W| + ||B|| ||(I + B)^-1||), u the unit roundoff of
// the weight's dtype (W' was rounded to it before the inverse multiplies it). Each factor at most
// 1e4 (float32: under 6e-4 (|W| + 1)), and at most 2^-4 / u, so that a half-precision weight's
// error stays under about 2^-4 (|W| + 1): 16 for bfloat16 (u = 2^-8), 128 for float16. Above
// that it came back as garbage: 8 times its largest value at cond 5000 in bfloat16 (a review,
// 2026-12-05; PEFT never refuses).
constexpr double kBatMaxCondition = 1e4;
double bat_max_condition(at::ScalarType weight_dtype);

// The dtype bat_linear builds W' and runs its GEMM in: compute_dtype where given, else PEFT's,
// the dtype of W + delta with the delta in the block's dtype, promote(weight, block) (the block's
// for the usual float32 block beside a half or float32 base; float64 where either is).
inline at::ScalarType bat_linear_dtype(const at::Tensor& weight, const at::Tensor& block,
                                       std::optional<at::ScalarType> compute_dtype) {
  return compute_dtype.value_or(c10::promoteTypes(weight.scalar_type(), block.scalar_type()));
}

// Composite kernels (device-generic, dispatcher calls only).
at::Tensor bat_weight_kernel(const at::Tensor& weight, const at::Tensor& block, std::optional<at::ScalarType> dtype);
at::Tensor bat_linear_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& block, std::optional<at::ScalarType> compute_dtype);
void bat_merge_inplace(at::Tensor& weight, const at::Tensor& block, bool reverse);

// dL/dB from dL/dW' (G', weight-shaped): dB_i = sum_j (W_ij + I)^T G'_ij, in the block's dtype.
at::Tensor bat_block_grad(const at::Tensor& grad_wprime, const at::Tensor& weight, const at::Tensor& block);
// dL/dW from dL/dW': dW_ij = G'_ij + G'_ij B_i^T (= G'_ij (I + B_i)^T), in the weight's dtype.
at::Tensor bat_weight_grad(const at::Tensor& grad_wprime, const at::Tensor& weight, const at::Tensor& block);

struct BatLinearGrads {
  at::Tensor x, weight, bias, block;
};
using BatNeeds = std::array<bool, 4>;  // x, weight, bias, block

// Backward of bat_linear: W' is rebuilt from (weight, block), never saved. G' = G^T x is
// computed in chunks of row blocks, each reduced to its slice of dB (and dW) at once. x is
// needed (and may only be defined) when the weight or block gradient is.
BatLinearGrads bat_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, at::ScalarType x_dtype,
                                   const at::Tensor& weight, at::ScalarType bias_dtype, const at::Tensor& block,
                                   std::optional<at::ScalarType> compute_dtype, BatNeeds needs);

}  // namespace miss_ext
