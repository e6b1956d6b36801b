// Meta kernels: shapes and dtypes only, from symbolic sizes, so torch.compile and torch.export
// trace the ops with dynamic shapes. They validate as the real kernels do (an in-place op's
// inference-tensor refusal included, so a fake or meta trace refuses what the run would), but for
// memory overlap: that check reads strides and offsets as concrete numbers, which a trace with
// symbolic shapes does not have, and traced in-place ops are functionalized before they run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/sym_shape.h"

namespace miss_ext {
namespace {

at::Tensor fold_meta(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key,
                     std::optional<at::ScalarType> dtype) {
  check_fold_args(x, r, p, key);
  check_out_dtype("fold dtype", dtype);
  return at::empty_symint(with_last(x, r), x.options().dtype(dtype.value_or(x.scalar_type())));
}

void tile_add_meta(at::Tensor& out, const at::Tensor& src, double alpha, double p,
                   const std::optional<at::Tensor>& key) {
  check_tile_add_args(out, src, p, key);
  check_writable("tile_add_", out, "out");
}

at::Tensor tile_add_functional_meta(const at::Tensor& out, const at::Tensor& src, double alpha, double p,
                                   const std::optional<at::Tensor>& key) {
  check_tile_add_args(out, src, p, key);
  return at::empty_symint(out.sym_sizes(), out.options());
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  check_linear_args(x, weight, bias, block, p, key);
  return at::empty_symint(with_last(x, weight.sym_size(0)), x.options());
}

at::Tensor merge_meta(const at::Tensor& weight, const at::Tensor& block, bool reverse) {
  check_merge_args(weight, block);
  return at::empty_symint(weight.sym_sizes(), weight.options());
}

void merge_inplace_meta(at::Tensor& weight, const at::Tensor& block, bool reverse) {
  check_merge_args(weight, block);
  check_writable("merge_", weight, "weight");
}

at::Tensor bat_transform_meta(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                              std::optional<at::ScalarType> dtype, bool /*residual*/) {
  check_bat_transform_args(w, m, p);
  check_out_dtype("bat_transform dtype", dtype);
  return at::empty_symint(w.sym_sizes(), w.options().dtype(dtype.value_or(w.scalar_type())));
}

void bat_transform_inplace_meta(at::Tensor& w, const at::Tensor& m, const at::Tensor& p, bool /*residual*/) {
  check_bat_transform_args(w, m, p);
  check_writable("bat_transform_", w, "w");
}

at::Tensor bat_weight_meta(const at::Tensor& weight, const at::Tensor& block, std::optional<at::ScalarType> dtype) {
  check_bat_args(weight, block);
  check_out_dtype("bat_weight dtype", dtype);
  return at::empty_symint(weight.sym_sizes(), weight.options().dtype(dtype.value_or(block.scalar_type())));
}

at::Tensor bat_linear_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& block, std::optional<at::ScalarType> compute_dtype) {
  check_bat_linear_args(x, weight, bias, block, compute_dtype);
  return at::empty_symint(with_last(x, weight.sym_size(0)), x.options());
}

at::Tensor bank_add_meta(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                         const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  check_bank_args(y, s, bank, ranks, periods, index);
  return at::empty_symint(y.sym_sizes(), y.options());
}

void bank_add_inplace_meta(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                           const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  check_bank_args(y, s, bank, ranks, periods, index);
  check_writable("bank_add_", y, "y");
}

std::tuple<at::Tensor, at::Tensor> bank_add_backward_meta(const at::Tensor& grad, const at::Tensor& s,
                                                          const at::Tensor& bank, const at::Tensor& ranks,
                                                          const at::Tensor& periods, const at::Tensor& index,
                                                          bool per_row_fold) {
  check_bank_args(grad, s, bank, ranks, periods, index);
  return {at::empty_symint(s.sym_sizes(), s.options()), at::empty_symint(bank.sym_sizes(), bank.options())};
}

at::Tensor bank_fold_meta(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                          const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key,
                          std::optional<at::ScalarType> dtype) {
  check_bank_fold_args(x, index, ranks, max_r, dropouts, key);
  check_out_dtype("bank_fold dtype", dtype);
  return at::empty_symint(with_last(x, max_r), x.options().dtype(dtype.value_or(x.scalar_type())));
}

at::Tensor bank_fold_backward_meta(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                                   c10::SymInt in_features, const std::optional<at::Tensor>& dropouts,
                                   const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
  check_bank_fold_backward_args(grad, index, ranks, in_features, dropouts, key);
  check_out_dtype("bank_fold_backward dtype", dtype);
  return at::empty_symint(with_last(grad, in_features), grad.options().dtype(dtype.value_or(grad.scalar_type())));
}

at::Tensor split_addmm_meta(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  check_split_addmm_args("split_addmm", y, a, b);
  return at::empty_like(y, at::MemoryFormat::Contiguous);
}

void split_addmm_inplace_meta(at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  check_split_addmm_args("split_addmm_", y, a, b);
  check_writable("split_addmm_", y, "y");
}

at::Tensor split_bf16_meta(const at::Tensor& t, int64_t parts, at::IntArrayRef order, int64_t dim) {
  dim = check_split_bf16_args(t, parts, order, dim);
  const int64_t blocks = static_cast<int64_t>(order.size());
  return at::empty_symint(dim == 0 ? std::vector<c10::SymInt>{t.sym_size(0) * blocks, t.sym_size(1)}
                                   : std::vector<c10::SymInt>{t.sym_size(0), t.sym_size(1) * blocks},
                          t.options().dtype(at::kBFloat16));
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, Meta, m) {
  m.impl("bank_add", &bank_add_meta);
  m.impl("bank_add_", &bank_add_inplace_meta);
  m.impl("bank_add_backward", &bank_add_backward_meta);
  m.impl("bank_fold", &bank_fold_meta);
  m.impl("bank_fold_backward", &bank_fold_backward_meta);
  m.impl("fold", &fold_meta);
  m.impl("tile_add_", &tile_add_meta);
  m.impl("tile_add", &tile_add_functional_meta);
  m.impl("linear", &linear_meta);
  m.impl("merge", &merge_meta);
  m.impl("merge_", &merge_inplace_meta);
  m.impl("bat_transform", &bat_transform_meta);
  m.impl("bat_transform_", &bat_transform_inplace_meta);
  m.impl("bat_weight", &bat_weight_meta);
  m.impl("bat_linear", &bat_linear_meta);
  m.impl("split_addmm", &split_addmm_meta);
  m.impl("split_addmm_", &split_addmm_inplace_meta);
  m.impl("split_bf16", &split_bf16_meta);
}

}  // namespace miss_ext
