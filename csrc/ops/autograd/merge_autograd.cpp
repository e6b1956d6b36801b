// Autograd for the functional miss::merge: the merged weight is differentiable in the weight and
// in the block (default/mini: identity and the gradient folded onto the block's shape; bat: the
// formulas of bat_weight). The bat unmerge is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../merge.h"

namespace miss_ext {
namespace {

class MergeFunction : public torch::autograd::Function<MergeFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& block,
                            bool reverse) {
    ctx->saved_data["reverse"] = reverse;
    ctx->save_for_backward({weight, block});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::merge(weight, block, reverse);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grad_outputs[0];
    return {merge_weight_grad(g, saved[0], saved[1]), merge_block_grad(g, saved[0], saved[1], ctx->saved_data["reverse"].toBool()),
            at::Tensor()};
  }
};

at::Tensor merge_autograd(const at::Tensor& weight, const at::Tensor& block, bool reverse) {
  // Checked here: inside Function::forward grad mode is already off.
  TORCH_CHECK(!(block.dim() == 3 && reverse && at::GradMode::is_enabled() &&
                (weight.requires_grad() || block.requires_grad())),
              "miss::merge: the bat unmerge (reverse=True) is not differentiable; call it under torch.no_grad()");
  return MergeFunction::apply(weight, block, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) { m.impl("merge", &merge_autograd); }

}  // namespace miss_ext
