// miss::linear: y = x W^T + b + fold(dropout(x)) * tile(block), for the default and mini modes.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

namespace miss_ext {
namespace ops {

// C++ API: calls through the dispatcher (autograd included).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& block, double p = 0.0, const std::optional<at::Tensor>& key = std::nullopt);

}  // namespace ops

struct LinearForward {
  at::Tensor y;  // (..., out), x's dtype
  at::Tensor s;  // (rows, r), block's dtype: all the adapter branch keeps for backward
};

struct LinearGrads {
  at::Tensor x, weight, bias, block;  // undefined where not requested
};

// Which gradients to compute, in the order of LinearGrads.
using LinearNeeds = std::array<bool, 4>;

// Forward and backward built from dispatcher calls only (miss::fold, miss::tile_add(_), aten), so
// that autograd tracing (torch.compile, export) records each step. Sizes are read symbolically.

// S = fold(dropout(x)) (rows, r) in the block's dtype: the adapter branch's input. Arguments
// are checked first (check_linear_args).
at::Tensor linear_fold(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& block, double p, const std::optional<at::Tensor>& key);

// y = x W^T + b + S tile(block) from a precomputed S, with PEFT's precision.
at::Tensor linear_with_fold(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& block, const at::Tensor& s);

LinearForward linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& block, double p, const std::optional<at::Tensor>& key);

// x is needed only for the weight gradient and may be undefined otherwise; the weight only for
// the input gradient (`in`: its in_features). Differentiable: with grad mode on
// (create_graph=True) every step is recorded (miss::fold, miss::tile_add, GEMMs), so second
// derivatives exist; S then carries its history to x (linear_autograd.cpp).
LinearGrads linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                            const c10::SymInt& in, const at::Tensor& block, const at::Tensor& s, double p,
                            const std::optional<at::Tensor>& key, LinearNeeds needs);

// The backend kernel registered at CPU and CUDA: the forward without keeping S.
at::Tensor linear_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& block, double p, const std::optional<at::Tensor>& key);

}  // namespace miss_ext
