// Autograd for the bat ops. bat_linear saves x, the weight and the block, never W': its backward
// rebuilds W' (bat.h), so after the forward nothing weight-sized is kept besides the frozen W.
// The backwards are differentiable (miss::bat_weight, miss::fold, GEMMs, and ATen in place of
// bat_transform when recorded), so second derivatives exist.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../bat.h"
#include "not_differentiable.h"

namespace miss_ext {
namespace {

class BatWeightFunction : public torch::autograd::Function<BatWeightFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& block,
                            std::optional<at::ScalarType> dtype) {
    ctx->saved_data["needs"] = std::vector<bool>{weight.requires_grad(), block.requires_grad()};
    ctx->save_for_backward({weight, block});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bat_weight(weight, block, dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    const at::Tensor& g = grad_outputs[0];
    return {needs[0] ? bat_weight_grad(g, saved[0], saved[1]) : at::Tensor(),
            needs[1] ? bat_block_grad(g, saved[0], saved[1]) : at::Tensor(), at::Tensor()};
  }
};

class BatLinearFunction : public torch::autograd::Function<BatLinearFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd: see linear_autograd.cpp
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& block,
                            std::optional<at::ScalarType> compute_dtype) {
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["needs"] = std::vector<bool>{x.requires_grad(), weight.requires_grad(),
                                                 has_bias && bias->requires_grad(), block.requires_grad()};
    ctx->saved_data["bias_dtype"] = has_bias ? bias->scalar_type() : x.scalar_type();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    if (compute_dtype.has_value()) ctx->saved_data["compute_dtype"] = *compute_dtype;
    // x is needed for dB and dW only; W' is not saved.
    const bool keep_x = weight.requires_grad() || block.requires_grad();
    ctx->save_for_backward({keep_x ? x : at::Tensor(), weight, block});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::bat_linear(x, weight, bias, block, compute_dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const c10::List<bool> n = ctx->saved_data["needs"].toBoolList();
    const BatNeeds needs{n[0], n[1], n[2], n[3]};
    std::optional<at::ScalarType> cd;
    if (ctx->saved_data.count("compute_dtype")) cd = ctx->saved_data["compute_dtype"].toScalarType();
    const at::ScalarType bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
    const BatLinearGrads g = bat_linear_backward(grad_outputs[0], saved[0], ctx->saved_data["x_dtype"].toScalarType(),
                                                 saved[1], bias_dtype, saved[2], cd, needs);
    return {g.x, g.weight, g.bias, g.block, at::Tensor()};
  }
};

at::Tensor bat_weight_autograd(const at::Tensor& weight, const at::Tensor& block, std::optional<at::ScalarType> dtype) {
  return BatWeightFunction::apply(weight, block, dtype);
}

at::Tensor bat_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& block, std::optional<at::ScalarType> compute_dtype) {
  return BatLinearFunction::apply(x, weight, bias, block, compute_dtype);
}

at::Tensor bat_transform_autograd(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                                  std::optional<at::ScalarType> dtype, bool residual) {
  at::Tensor out;
  run_not_differentiable("bat_transform", "bat_weight", {w, m, p},
                         [&] { out = ops::bat_transform(w, m, p, dtype, residual); });
  return out;
}

void bat_transform_inplace_autograd(at::Tensor& w, const at::Tensor& m, const at::Tensor& p, bool residual) {
  run_not_differentiable("bat_transform_", "bat_weight", {w, m, p}, [&] { ops::bat_transform_(w, m, p, residual); });
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Autograd, m) {
  m.impl("bat_weight", &bat_weight_autograd);
  m.impl("bat_linear", &bat_linear_autograd);
  m.impl("bat_transform", &bat_transform_autograd);
  m.impl("bat_transform_", &bat_transform_inplace_autograd);
}

}  // namespace miss_ext
