#include "bank_fold.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>

#include "common/checks.h"
#include "fold.h"

namespace miss_ext {
namespace ops {

at::Tensor bank_fold(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                     const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key,
                     std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bank_fold", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         std::optional<at::ScalarType>)>();
  return op.call(x, index, ranks, max_r, dropouts, key, dtype);
}

at::Tensor bank_fold_backward(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                              c10::SymInt in_features, const std::optional<at::Tensor>& dropouts,
                              const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bank_fold_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         std::optional<at::ScalarType>)>();
  return op.call(grad, index, ranks, std::move(in_features), dropouts, key, dtype);
}

}  // namespace ops

namespace {

// What the kernels take: index as one row per entry, contiguous ranks and dropouts, and the key
// words (kept alive by `words` until the kernel is enqueued; null without dropout).
struct BankFoldArgs {
  at::Tensor index, ranks, dropouts, words;
  const int64_t* key = nullptr;
};

BankFoldArgs bank_fold_args(const at::Tensor& index, const at::Tensor& ranks, const std::optional<at::Tensor>& dropouts,
                            const std::optional<at::Tensor>& key) {
  BankFoldArgs a{index.reshape({index.numel()}).contiguous(), ranks.contiguous(), at::Tensor(), at::Tensor()};
  if (dropouts.has_value() && dropouts->defined()) {
    a.dropouts = dropouts->contiguous();
    a.words = key->contiguous();  // check_bank_fold_args: a key comes with dropouts
    a.key = a.words.const_data_ptr<int64_t>();
  }
  return a;
}

}  // namespace

at::Tensor bank_fold_with(BankFoldKernel kernel, const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks,
                          int64_t max_r, const std::optional<at::Tensor>& dropouts,
                          const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
  check_bank_fold_args(x, index, ranks, max_r, dropouts, key);
  check_out_dtype("bank_fold dtype", dtype);
  const at::ScalarType out_dtype = dtype.value_or(x.scalar_type());
  const int64_t in = x.size(-1);
  const int64_t rows = leading_rows(x);
  const bool dropout = dropouts.has_value() && dropouts->defined();
  check_dropout_extent(rows, in, dropout ? 1.0 : 0.0);
  const at::Tensor src = fold_source(x, out_dtype);
  at::Tensor s = at::empty({rows, max_r}, x.options().dtype(fold_kernel_dtype(src.scalar_type(), out_dtype)));
  if (rows > 0) {
    const BankFoldArgs a = bank_fold_args(index, ranks, dropouts, key);
    kernel(src.reshape({rows, in}).contiguous(), s, a.index, a.ranks, a.dropouts, a.key);
  }
  if (s.scalar_type() != out_dtype) s = s.to(out_dtype);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = max_r;
  return s.view(shape);
}

at::Tensor bank_fold_backward_with(BankFoldGradKernel kernel, const at::Tensor& grad, const at::Tensor& index,
                                   const at::Tensor& ranks, c10::SymInt in_features,
                                   const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key,
                                   std::optional<at::ScalarType> dtype) {
  check_bank_fold_backward_args(grad, index, ranks, in_features, dropouts, key);
  check_out_dtype("bank_fold_backward dtype", dtype);
  const int64_t in = in_features.guard_int(__FILE__, __LINE__);
  const at::ScalarType out_dtype = dtype.value_or(grad.scalar_type());
  const int64_t rows = leading_rows(grad);
  const bool dropout = dropouts.has_value() && dropouts->defined();
  check_dropout_extent(rows, in, dropout ? 1.0 : 0.0);
  std::vector<int64_t> shape = grad.sizes().vec();
  shape.back() = in;
  at::Tensor grad_x = at::empty({rows, in}, grad.options().dtype(out_dtype));
  if (rows > 0 && in == 0) {
    // No kernel runs for rows of no columns: their ids and ranks are checked here, as the kernel
    // would (a fuzz of the ops, 2026-12-06: accepted before; bank_fold refused them).
    check_bank_fold_values_on_host("bank_fold_backward", "grad.shape[-1]", ranks, dropouts, index, grad.size(-1));
  } else if (rows > 0) {
    at::Tensor g = grad.reshape({rows, grad.size(-1)});
    // The kernels read grad_x's dtype or float32: anything else is converted once (small: rows x R).
    if (g.scalar_type() != out_dtype && g.scalar_type() != at::kFloat) g = g.to(at::kFloat);
    const BankFoldArgs a = bank_fold_args(index, ranks, dropouts, key);
    kernel(g.contiguous(), grad_x, a.index, a.ranks, a.dropouts, a.key);
  }
  return grad_x.view(shape);
}

}  // namespace miss_ext
