// Autograd of miss::split_addmm, miss::split_addmm_ and miss::split_bf16 (split_gemm.h): none. They are called below
// miss::linear's autograd, on tensors that do not require grad; called directly with one that
// does, they refuse (the differentiable miss::linear computes the same).
#include <torch/library.h>

#include "../split_gemm.h"
#include "not_differentiable.h"

namespace miss_ext {
namespace {

at::Tensor split_addmm_autograd(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out;
  run_not_differentiable("split_addmm", "linear", {y, a, b}, [&] { out = ops::split_addmm(y, a, b); });
  return out;
}

void split_addmm_inplace_autograd(at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  run_not_differentiable("split_addmm_", "linear", {y, a, b}, [&] { ops::split_addmm_(y, a, b); });
}

at::Tensor split_bf16_autograd(const at::Tensor& t, int64_t parts, at::IntArrayRef order, int64_t dim) {
  at::Tensor out;
  run_not_differentiable("split_bf16", "linear", {t}, [&] { out = ops::split_bf16(t, parts, order, dim); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) {
  m.impl("split_addmm", &split_addmm_autograd);
  m.impl("split_addmm_", &split_addmm_inplace_autograd);
  m.impl("split_bf16", &split_bf16_autograd);
}

}  // namespace miss_ext
