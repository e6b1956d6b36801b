// Autograd for miss::linear, in C++ so TorchScript and libtorch users get gradients too.
//
// Saved for backward: the block (a parameter, no copy), the folded S (rows x r) and the dropout
// key (two integers). The weight is saved only when x requires grad (for dx), x only when the
// weight does (for dW): a frozen base built under torch.inference_mode() holds inference tensors,
// which autograd cannot save, and PEFT trains an adapter on it from an x that needs no grad. No
// rows x in tensor is kept for the adapter branch: the backward regenerates the dropout mask
// from the key. The backward is itself differentiable (double backward, Hessian-vector products).
#include <torch/autograd.h>
#include <torch/library.h>

#include "../linear.h"

namespace miss_ext {
namespace {

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // Compiled autograd (torch._dynamo.compiled_autograd) traces the backward instead of running it
  // eagerly behind a graph break (fullgraph=True failed): it reads only saved tensors and
  // saved_data and makes dispatcher calls, which is what the flag promises. So do the other
  // Functions of this folder (tests/test_compiled_autograd.py).
  static constexpr bool is_traceable = true;
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& block, double p,
                            const std::optional<at::Tensor>& key) {
    const bool bias_grad = bias.has_value() && bias->defined() && bias->requires_grad();
    ctx->saved_data["needs"] = std::vector<bool>{x.requires_grad(), weight.requires_grad(), bias_grad,
                                                 block.requires_grad()};
    ctx->saved_data["p"] = p;
    // S is computed through miss::fold's autograd when x requires grad (grad mode is off inside a
    // Function's forward; it is turned on for this call only): the saved S then carries its
    // history to x, so a second differentiation of the backward (which uses S) reaches x. It
    // costs one graph node holding the key, no memory.
    at::Tensor s;
    {
      const at::AutoGradMode record(x.requires_grad());
      s = linear_fold(x, weight, bias, block, p, key);
    }
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = linear_with_fold(x, weight, bias, block, s);
    }
    const at::Tensor dropout_key = p > 0.0 && key.has_value() ? *key : at::Tensor();
    ctx->saved_data["in"] = weight.sym_size(1);
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(), x.requires_grad() ? weight : at::Tensor(),
                            block, s, dropout_key});
    return y;
  }

  // Differentiable (linear.h): with create_graph=True the steps are recorded.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const c10::List<bool> needs_list = ctx->saved_data["needs"].toBoolList();
    const LinearNeeds needs{needs_list[0], needs_list[1], needs_list[2], needs_list[3]};
    const double p = ctx->saved_data["p"].toDouble();
    const std::optional<at::Tensor> key = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const LinearGrads g = linear_backward(grad_outputs[0], saved[0], saved[1], ctx->saved_data["in"].toSymInt(),
                                              saved[2], saved[3], p, key, needs);
    return {g.x, g.weight, g.bias, g.block, at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  return LinearFunction::apply(x, weight, bias, block, p, key);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) { m.impl("linear", &linear_autograd); }

}  // namespace miss_ext
