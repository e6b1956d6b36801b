#include "bank.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>

#include <utility>

#include "common/checks.h"
#include "fold.h"

namespace miss_ext {
namespace ops {

at::Tensor bank_add(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                    const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bank_add", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(y, s, bank, ranks, periods, index, per_row_fold);
}

void bank_add_(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
               const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bank_add_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, bool)>();
  op.call(y, s, bank, ranks, periods, index, per_row_fold);
}

std::tuple<at::Tensor, at::Tensor> bank_add_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank,
                                                     const at::Tensor& ranks, const at::Tensor& periods,
                                                     const at::Tensor& index, bool per_row_fold) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bank_add_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(grad, s, bank, ranks, periods, index, per_row_fold);
}

}  // namespace ops

at::Tensor bank_add_functional_kernel(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank,
                                      const at::Tensor& ranks, const at::Tensor& periods, const at::Tensor& index,
                                      bool per_row_fold) {
  check_bank_args(y, s, bank, ranks, periods, index);
  at::Tensor result = y.clone(at::MemoryFormat::Contiguous);
  ops::bank_add_(result, s, bank, ranks, periods, index, per_row_fold);
  return result;
}

namespace {

// The kernels' view of the arguments: 2-D rows, contiguous. y is written through `y2`, which is
// y itself when y is contiguous and a copy (written back afterwards) otherwise.
struct BankArgs {
  at::Tensor s, bank, ranks, periods, index;
};

BankArgs bank_args(const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks, const at::Tensor& periods,
                   const at::Tensor& index) {
  const int64_t rows = index.numel();
  return BankArgs{s.reshape({rows, s.size(-1)}).contiguous(), bank.contiguous(), ranks.contiguous(),
                  periods.contiguous(), index.reshape({rows}).contiguous()};
}

}  // namespace

void bank_add_with(BankAddKernel kernel, at::Tensor& y, const at::Tensor& s, const at::Tensor& bank,
                   const at::Tensor& ranks, const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  check_bank_args(y, s, bank, ranks, periods, index);
  // The kernels read the inputs while they write y (as tile_add_ and bat_transform_).
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{s, "s"}, {bank, "bank"}, {ranks, "ranks"},
                                {periods, "periods"}, {index, "index"}}) {
    check_no_overlap("bank_add_", y, "y", t, name);
  }
  check_writable("bank_add_", y, "y");
  // An empty bank still goes to the kernel, which checks the ids: a row naming a slot of an empty
  // bank is an error, not a row that silently keeps y. Rows of no columns (out_features 0) launch
  // no kernel: their ids, ranks and periods are checked here (a fuzz of the ops, 2026-12-06:
  // accepted before).
  if (y.numel() == 0) {
    check_bank_values_on_host(s, bank, ranks, periods, index, y.size(-1), per_row_fold);
    return;
  }
  const BankArgs a = bank_args(s, bank, ranks, periods, index);
  const int64_t rows = a.index.numel();
  if (y.is_contiguous()) {
    at::Tensor y2 = y.view({rows, y.size(-1)});
    kernel(y2, a.s, a.bank, a.ranks, a.periods, a.index, per_row_fold);
  } else {
    at::Tensor y2 = y.reshape({rows, y.size(-1)}).contiguous();
    kernel(y2, a.s, a.bank, a.ranks, a.periods, a.index, per_row_fold);
    y.copy_(y2.view(y.sizes()));
  }
}

std::tuple<at::Tensor, at::Tensor> bank_add_backward_with(BankGradKernel kernel, const at::Tensor& grad,
                                                          const at::Tensor& s, const at::Tensor& bank,
                                                          const at::Tensor& ranks, const at::Tensor& periods,
                                                          const at::Tensor& index, bool per_row_fold) {
  check_bank_args(grad, s, bank, ranks, periods, index);
  at::Tensor grad_s = at::zeros(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_bank = at::zeros(bank.sizes(), bank.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0 || s.size(-1) == 0) {
    check_bank_values_on_host(s, bank, ranks, periods, index, grad.size(-1), per_row_fold);  // as bank_add_with
    return {grad_s, grad_bank};
  }
  const BankArgs a = bank_args(s, bank, ranks, periods, index);
  const int64_t rows = a.index.numel();
  const at::Tensor g = grad.reshape({rows, grad.size(-1)}).contiguous();
  at::Tensor grad_s2 = grad_s.view({rows, s.size(-1)});
  kernel(g, a.s, a.bank, a.ranks, a.periods, a.index, per_row_fold, grad_s2, grad_bank);
  return {grad_s, grad_bank};
}

}  // namespace miss_ext
