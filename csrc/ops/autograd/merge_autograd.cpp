// Autograd for the functional miss::merge: the merged weight is differentiable in the weight
// (identity) and in the block (the weight gradient folded back onto the block's shape).
#include <torch/autograd.h>
#include <torch/library.h>

#include "../merge.h"

namespace miss_ext {
namespace {

class MergeFunction : public torch::autograd::Function<MergeFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& block,
                            bool reverse) {
    ctx->saved_data["reverse"] = reverse;
    ctx->save_for_backward({block});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::merge(weight, block, reverse);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor block = ctx->get_saved_variables()[0];
    const at::Tensor& g = grad_outputs[0];
    return {g, merge_block_grad(g, block, ctx->saved_data["reverse"].toBool()), at::Tensor()};
  }
};

at::Tensor merge_autograd(const at::Tensor& weight, const at::Tensor& block, bool reverse) {
  return MergeFunction::apply(weight, block, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) { m.impl("merge", &merge_autograd); }

}  // namespace miss_ext
