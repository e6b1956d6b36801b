// Autograd for miss::fold (its adjoint is miss::tile_add_ into zeros), and the guards of the
// in-place ops tile_add_ and merge_ (not_differentiable.h).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../fold.h"
#include "../merge.h"
#include "not_differentiable.h"
#include "once_differentiable.h"

namespace miss_ext {
namespace {

class FoldFunction : public torch::autograd::Function<FoldFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t r, double p,
                            const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["x_sizes"] = x.sym_sizes().vec();
    ctx->save_for_backward({p > 0.0 ? *key : at::Tensor()});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::fold(x, r, p, key, dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor key_t = ctx->get_saved_variables()[0];
    const std::optional<at::Tensor> key = key_t.defined() ? std::optional<at::Tensor>(key_t) : std::nullopt;
    const auto sizes = ctx->saved_data["x_sizes"].toSymIntList().vec();
    const auto dtype = ctx->saved_data["x_dtype"].toScalarType();
    const double p = ctx->saved_data["p"].toDouble();
    return once_differentiable("miss::fold", grad_outputs, [&]() -> torch::autograd::variable_list {
      at::Tensor grad_x = at::zeros_symint(sizes, grad_outputs[0].options().dtype(dtype));
      ops::tile_add_(grad_x, grad_outputs[0], 1.0, p, key);
      return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    });
  }
};

at::Tensor fold_autograd(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key,
                         std::optional<at::ScalarType> dtype) {
  return FoldFunction::apply(x, r, p, key, dtype);
}

void tile_add_autograd(at::Tensor& out, const at::Tensor& src, double alpha, double p,
                       const std::optional<at::Tensor>& key) {
  run_not_differentiable("tile_add_", {out, src}, out, [&] { ops::tile_add_(out, src, alpha, p, key); });
}

void merge_inplace_autograd(at::Tensor& weight, const at::Tensor& block, bool reverse) {
  run_not_differentiable("merge_", {weight, block}, weight, [&] { ops::merge_(weight, block, reverse); });
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) {
  m.impl("fold", &fold_autograd);
  m.impl("tile_add_", &tile_add_autograd);
  m.impl("merge_", &merge_inplace_autograd);
}

}  // namespace miss_ext
