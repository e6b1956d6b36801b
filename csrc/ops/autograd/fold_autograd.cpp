// Autograd for miss::fold and the functional miss::tile_add, each the other's adjoint, so both
// are differentiable to any order (double backward, Hessian-vector products); and the guards of
// the in-place ops tile_add_ and merge_ (not_differentiable.h).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../fold.h"
#include "../merge.h"
#include "not_differentiable.h"

namespace miss_ext {
namespace {

// The dropout key saved as the first variable (undefined when p == 0).
std::optional<at::Tensor> saved_key(torch::autograd::AutogradContext* ctx) {
  const at::Tensor key = ctx->get_saved_variables()[0];
  return key.defined() ? std::optional<at::Tensor>(key) : std::nullopt;
}

class FoldFunction : public torch::autograd::Function<FoldFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t r, double p,
                            const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["x_sizes"] = x.sym_sizes().vec();
    // key may be empty here (the op's checks run inside the call below and reject p > 0 without one).
    ctx->save_for_backward({p > 0.0 && key.has_value() ? *key : at::Tensor()});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::fold(x, r, p, key, dtype);
  }

  // grad_x = tile_add(0, grad_s) with the forward's mask. Built from miss::tile_add, whose own
  // backward is fold: with create_graph=True this is recorded and can be differentiated again.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const std::optional<at::Tensor> key = saved_key(ctx);
    const auto sizes = ctx->saved_data["x_sizes"].toSymIntList().vec();
    const auto dtype = ctx->saved_data["x_dtype"].toScalarType();
    const double p = ctx->saved_data["p"].toDouble();
    // new_zeros of the gradient, not at::zeros: a tensor subclass gradient (a DTensor under
    // tensor parallelism) then gets zeros of its own kind, which tile_add can combine with it.
    const at::Tensor zeros = grad_outputs[0].new_zeros_symint(sizes, grad_outputs[0].options().dtype(dtype));
    return {ops::tile_add(zeros, grad_outputs[0], 1.0, p, key), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// The functional tile_add: d/dout is the identity, d/dsrc is fold (tile_add_src_grad), both
// differentiable again.
class TileAddFunction : public torch::autograd::Function<TileAddFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& out, const at::Tensor& src,
                            double alpha, double p, const std::optional<at::Tensor>& key) {
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["p"] = p;
    ctx->saved_data["out_dtype"] = out.scalar_type();
    ctx->saved_data["src_dtype"] = src.scalar_type();
    ctx->saved_data["src_sizes"] = src.sym_sizes().vec();
    ctx->saved_data["needs"] = std::vector<bool>{out.requires_grad(), src.requires_grad()};
    // key may be empty here (the op's checks run inside the call below and reject p > 0 without one).
    ctx->save_for_backward({p > 0.0 && key.has_value() ? *key : at::Tensor()});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::tile_add(out, src, alpha, p, key);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const std::optional<at::Tensor> key = saved_key(ctx);
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    const at::Tensor& g = grad_outputs[0];
    at::Tensor grad_out, grad_src;
    if (needs[0]) grad_out = g.to(ctx->saved_data["out_dtype"].toScalarType());
    if (needs[1]) {
      const auto src_sizes = ctx->saved_data["src_sizes"].toSymIntList().vec();
      grad_src = tile_add_src_grad(g, src_sizes, ctx->saved_data["src_dtype"].toScalarType(),
                                   ctx->saved_data["alpha"].toDouble(), ctx->saved_data["p"].toDouble(), key);
    }
    return {grad_out, grad_src, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor fold_autograd(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key,
                         std::optional<at::ScalarType> dtype) {
  return FoldFunction::apply(x, r, p, key, dtype);
}

at::Tensor tile_add_functional_autograd(const at::Tensor& out, const at::Tensor& src, double alpha, double p,
                                        const std::optional<at::Tensor>& key) {
  return TileAddFunction::apply(out, src, alpha, p, key);
}

void tile_add_autograd(at::Tensor& out, const at::Tensor& src, double alpha, double p,
                       const std::optional<at::Tensor>& key) {
  run_not_differentiable("tile_add_", "tile_add", {out, src}, [&] { ops::tile_add_(out, src, alpha, p, key); });
}

void merge_inplace_autograd(at::Tensor& weight, const at::Tensor& block, bool reverse) {
  run_not_differentiable("merge_", "merge", {weight, block}, [&] { ops::merge_(weight, block, reverse); });
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) {
  m.impl("fold", &fold_autograd);
  m.impl("tile_add", &tile_add_functional_autograd);
  m.impl("tile_add_", &tile_add_autograd);
  m.impl("merge_", &merge_inplace_autograd);
}

}  // namespace miss_ext
