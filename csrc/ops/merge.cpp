#include "merge.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "common/checks.h"
#include "fold.h"

namespace miss_ext {
namespace ops {

at::Tensor merge(const at::Tensor& weight, const at::Tensor& block, bool reverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::merge", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(weight, block, reverse);
}

void merge_(at::Tensor& weight, const at::Tensor& block, bool reverse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::merge_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, bool)>();
  op.call(weight, block, reverse);
}

}  // namespace ops

void merge_inplace_kernel(at::Tensor& weight, const at::Tensor& block, bool reverse) {
  check_merge_args(weight, block);
  // dW = block^T tiled over (out, in): src (mini_r, r) repeats along both axes.
  ops::tile_add_(weight, block.t().contiguous(), reverse ? -1.0 : 1.0);
}

at::Tensor merge_kernel(const at::Tensor& weight, const at::Tensor& block, bool reverse) {
  check_merge_args(weight, block);
  at::Tensor merged = weight.clone(at::MemoryFormat::Contiguous);
  merge_inplace_kernel(merged, block, reverse);
  return merged;
}

at::Tensor merge_block_grad(const at::Tensor& grad_weight, const at::Tensor& block, bool reverse) {
  const int64_t r = block.sym_size(0).guard_int(__FILE__, __LINE__);
  const int64_t mini_r = block.sym_size(1).guard_int(__FILE__, __LINE__);
  const at::Tensor by_in = ops::fold(grad_weight, r, 0.0, std::nullopt, block.scalar_type());  // (out, r)
  at::Tensor grad = ops::fold(by_in.t(), mini_r, 0.0, std::nullopt, block.scalar_type());       // (r, mini_r)
  return reverse ? grad.neg() : grad;
}

}  // namespace miss_ext
