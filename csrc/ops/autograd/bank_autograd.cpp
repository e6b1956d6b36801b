// Autograd for miss::bank_add: the output is differentiable in y (identity), s and bank
// (miss::bank_add_backward, which reduces each slot's gradient over its own rows only). The
// backward is not differentiable again: with create_graph=True it raises rather than silently
// returning a zero second derivative. bank_add_ (in place) is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../bank.h"
#include "not_differentiable.h"

namespace miss_ext {
namespace {

class BankAddFunction : public torch::autograd::Function<BankAddFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& s,
                            const at::Tensor& bank, const at::Tensor& ranks, const at::Tensor& periods,
                            const at::Tensor& index) {
    ctx->saved_data["y_dtype"] = y.scalar_type();
    ctx->save_for_backward({s, bank, ranks, periods, index});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bank_add(y, s, bank, ranks, periods, index);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grad_outputs[0];
    at::Tensor grad_y, grad_s, grad_bank;
    if (ctx->needs_input_grad(0)) grad_y = g.to(ctx->saved_data["y_dtype"].toScalarType());
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      std::tie(grad_s, grad_bank) = ops::bank_add_backward(g, saved[0], saved[1], saved[2], saved[3], saved[4]);
    }
    return {grad_y, ctx->needs_input_grad(1) ? grad_s : at::Tensor(), ctx->needs_input_grad(2) ? grad_bank : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bank_add_autograd(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                             const at::Tensor& periods, const at::Tensor& index) {
  return BankAddFunction::apply(y, s, bank, ranks, periods, index);
}

void bank_add_inplace_autograd(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                               const at::Tensor& periods, const at::Tensor& index) {
  run_not_differentiable("bank_add_", {y, s, bank}, y, [&] { ops::bank_add_(y, s, bank, ranks, periods, index); });
}

std::tuple<at::Tensor, at::Tensor> bank_add_backward_autograd(const at::Tensor& grad, const at::Tensor& s,
                                                              const at::Tensor& bank, const at::Tensor& ranks,
                                                              const at::Tensor& periods, const at::Tensor& index) {
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : {grad, s, bank}) {
      TORCH_CHECK(!t.requires_grad(), "miss::bank_add is differentiable once: its backward (miss::bank_add_backward) "
                  "has no derivative, so create_graph=True (double backward, Hessian-vector products) is not "
                  "supported through it");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::bank_add_backward(grad, s, bank, ranks, periods, index);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) {
  m.impl("bank_add", &bank_add_autograd);
  m.impl("bank_add_", &bank_add_inplace_autograd);
  m.impl("bank_add_backward", &bank_add_backward_autograd);
}

}  // namespace miss_ext
