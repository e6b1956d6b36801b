#include "merge.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "common/checks.h"
#include "bat.h"
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
  // Checked here, with merge_'s own names, for every mode and direction: the building blocks
  // below would refuse some overlaps under their own names and copy the block first in others.
  check_no_overlap("merge_", weight, "weight", block, "miss_block");
  check_writable("merge_", weight, "weight");
  if (block.dim() == 3) return bat_merge_inplace(weight, block, reverse);
  // dW = block^T tiled over (out, in): src (mini_r, r) repeats along both axes.
  ops::tile_add_(weight, block.t().contiguous(), reverse ? -1.0 : 1.0);
}

at::Tensor merge_kernel(const at::Tensor& weight, const at::Tensor& block, bool reverse) {
  check_merge_args(weight, block);
  at::Tensor merged = weight.clone(at::MemoryFormat::Contiguous);
  merge_inplace_kernel(merged, block, reverse);
  return merged;
}

at::Tensor merge_block_grad(const at::Tensor& grad_weight, int64_t r, int64_t mini_r, at::ScalarType block_dtype,
                            bool reverse) {
  const at::Tensor by_in = ops::fold(grad_weight, r, 0.0, std::nullopt, block_dtype);  // (out, r)
  at::Tensor grad = ops::fold(by_in.t(), mini_r, 0.0, std::nullopt, block_dtype);       // (r, mini_r)
  return reverse ? grad.neg() : grad;
}

}  // namespace miss_ext
