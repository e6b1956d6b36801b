// Autograd for the functional miss::merge: the merged weight is differentiable in the weight and
// in the block (default/mini: identity and the gradient folded onto the block's shape; bat: the
// formulas of bat_weight). The bat unmerge is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../bat.h"
#include "../common/sym_shape.h"
#include "../merge.h"

namespace miss_ext {
namespace {

class MergeFunction : public torch::autograd::Function<MergeFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& block,
                            bool reverse) {
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["bat"] = block.dim() == 3;
    if (block.dim() == 3) {
      ctx->save_for_backward({weight, block});  // bat's gradients read W and B
    } else if (block.dim() == 2) {  // any other rank: the op below raises its ValueError
      // Default/mini: the gradients need only the block's shape and dtype. Saving no tensor keeps
      // W out of memory until backward and lets the user change W or the block in place after
      // the merge, as with weight + delta in plain torch.
      ctx->saved_data["r"] = static_size(block, 0);
      ctx->saved_data["mini_r"] = static_size(block, 1);
      ctx->saved_data["block_dtype"] = block.scalar_type();
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::merge(weight, block, reverse);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const bool weight_needed = ctx->needs_input_grad(0), block_needed = ctx->needs_input_grad(1);
    if (ctx->saved_data["bat"].toBool()) {
      const auto saved = ctx->get_saved_variables();
      return {weight_needed ? bat_weight_grad(g, saved[0], saved[1]) : at::Tensor(),
              block_needed ? bat_block_grad(g, saved[0], saved[1]) : at::Tensor(), at::Tensor()};
    }
    return {weight_needed ? g : at::Tensor(),
            block_needed ? merge_block_grad(g, ctx->saved_data["r"].toInt(), ctx->saved_data["mini_r"].toInt(),
                                            ctx->saved_data["block_dtype"].toScalarType(), reverse)
                         : at::Tensor(),
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
