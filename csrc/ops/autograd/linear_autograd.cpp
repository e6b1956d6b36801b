// Autograd for miss::linear, in C++ so TorchScript and libtorch users get gradients too.
//
// Saved for backward: the weight and block (parameters, no copies), the folded S (rows x r) and
// the dropout key (two integers). x is saved only when the weight itself requires grad. No
// rows x in tensor is kept for the adapter branch: the backward regenerates the dropout mask
// from the key.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../linear.h"
#include "once_differentiable.h"

namespace miss_ext {
namespace {

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& block, double p,
                            const std::optional<at::Tensor>& key) {
    const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
    ctx->saved_data["needs"] = std::vector<bool>{x.requires_grad(), weight.requires_grad(), bias_grad,
                                                 block.requires_grad()};
    ctx->saved_data["p"] = p;
    LinearForward fwd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      fwd = linear_forward(x, weight, bias, block, p, key);
    }
    const at::Tensor dropout_key = p > 0.0 ? *key : at::Tensor();
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(), weight, block, fwd.s, dropout_key});
    return fwd.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const c10::List<bool> needs_list = ctx->saved_data["needs"].toBoolList();
    const LinearNeeds needs{needs_list[0], needs_list[1], needs_list[2], needs_list[3]};
    const double p = ctx->saved_data["p"].toDouble();
    const std::optional<at::Tensor> key = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    torch::autograd::variable_list depends_on(saved.begin(), saved.end());
    depends_on.push_back(grad_outputs[0]);
    return once_differentiable("miss::linear", depends_on, [&]() -> torch::autograd::variable_list {
      const LinearGrads g = linear_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], p, key, needs);
      return {g.x, g.weight, g.bias, g.block, at::Tensor(), at::Tensor()};
    });
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  return LinearFunction::apply(x, weight, bias, block, p, key);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace miss_ext
