// Autograd for miss::bank_add: the output is differentiable in y (identity), s and bank
// (miss::bank_add_backward, which reduces each slot's gradient over its own rows only); and for
// miss::bank_fold, differentiable in x (miss::bank_fold_backward, with the forward's masks). The
// backwards are not differentiable again: with create_graph=True they raise rather than silently
// returning a zero second derivative. bank_add_ (in place) is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../bank.h"
#include "../bank_fold.h"
#include "not_differentiable.h"

namespace miss_ext {
namespace {

class BankAddFunction : public torch::autograd::Function<BankAddFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& s,
                            const at::Tensor& bank, const at::Tensor& ranks, const at::Tensor& periods,
                            const at::Tensor& index, bool per_row_fold) {
    ctx->saved_data["y_dtype"] = y.scalar_type();
    ctx->saved_data["per_row_fold"] = per_row_fold;
    ctx->save_for_backward({s, bank, ranks, periods, index});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bank_add(y, s, bank, ranks, periods, index, per_row_fold);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grad_outputs[0];
    at::Tensor grad_y, grad_s, grad_bank;
    if (ctx->needs_input_grad(0)) grad_y = g.to(ctx->saved_data["y_dtype"].toScalarType());
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      std::tie(grad_s, grad_bank) = ops::bank_add_backward(g, saved[0], saved[1], saved[2], saved[3], saved[4],
                                                           ctx->saved_data["per_row_fold"].toBool());
    }
    return {grad_y, ctx->needs_input_grad(1) ? grad_s : at::Tensor(), ctx->needs_input_grad(2) ? grad_bank : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Refuses create_graph=True through a backward that has no derivative of its own.
void check_once_differentiable(const char* op, std::initializer_list<at::Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(!t.defined() || !t.requires_grad(), "miss::", op, " is differentiable once: its backward (miss::", op,
                "_backward) has no derivative, so create_graph=True (double backward, Hessian-vector products) is "
                "not supported through it");
  }
}

class BankFoldFunction : public torch::autograd::Function<BankFoldFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index,
                            const at::Tensor& ranks, int64_t max_r, const std::optional<at::Tensor>& dropouts,
                            const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
    ctx->saved_data["x_dtype"] = x.scalar_type();
    // A scalar x is refused by the op's checks in the call below (with a ValueError naming it).
    ctx->saved_data["in_features"] = x.dim() > 0 ? x.sym_size(-1) : c10::SymInt(0);
    const bool dropout = dropouts.has_value() && dropouts->defined();
    // dropouts and key may be inconsistent here: the op's checks run inside the call below.
    ctx->save_for_backward({index, ranks, dropout ? *dropouts : at::Tensor(),
                            dropout && key.has_value() ? *key : at::Tensor()});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bank_fold(x, index, ranks, max_r, dropouts, key, dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const at::Tensor grad_x =
        ops::bank_fold_backward(grad_outputs[0], saved[0], saved[1], ctx->saved_data["in_features"].toSymInt(),
                                optional(saved[2]), optional(saved[3]), ctx->saved_data["x_dtype"].toScalarType());
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bank_fold_autograd(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                              const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key,
                              std::optional<at::ScalarType> dtype) {
  return BankFoldFunction::apply(x, index, ranks, max_r, dropouts, key, dtype);
}

at::Tensor bank_fold_backward_autograd(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                                       c10::SymInt in_features, const std::optional<at::Tensor>& dropouts,
                                       const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
  check_once_differentiable("bank_fold", {grad});
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::bank_fold_backward(grad, index, ranks, std::move(in_features), dropouts, key, dtype);
}

at::Tensor bank_add_autograd(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                             const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  return BankAddFunction::apply(y, s, bank, ranks, periods, index, per_row_fold);
}

void bank_add_inplace_autograd(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                               const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  run_not_differentiable("bank_add_", "bank_add", {y, s, bank},
                         [&] { ops::bank_add_(y, s, bank, ranks, periods, index, per_row_fold); });
}

std::tuple<at::Tensor, at::Tensor> bank_add_backward_autograd(const at::Tensor& grad, const at::Tensor& s,
                                                              const at::Tensor& bank, const at::Tensor& ranks,
                                                              const at::Tensor& periods, const at::Tensor& index,
                                                              bool per_row_fold) {
  check_once_differentiable("bank_add", {grad, s, bank});
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::bank_add_backward(grad, s, bank, ranks, periods, index, per_row_fold);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) {
  m.impl("bank_add", &bank_add_autograd);
  m.impl("bank_add_", &bank_add_inplace_autograd);
  m.impl("bank_add_backward", &bank_add_backward_autograd);
  m.impl("bank_fold", &bank_fold_autograd);
  m.impl("bank_fold_backward", &bank_fold_backward_autograd);
}

}  // namespace miss_ext
