// CPU kernels of miss::bank_fold and its adjoint (kernels.h has the contract): parallel over rows;
// a row is folded as fold does (row_helpers.h) at the rank of the row's slot, with that slot's
// dropout rate. The slot values are checked on the host first (check_bank_fold_values).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/bank_index.h"
#include "../common/checks.h"
#include "../common/shard_index.h"
#include "../kernels.h"
#include "row_helpers.h"

namespace miss_ext {
namespace {

template <typename in_t, typename out_t>
void bank_fold_rows(const in_t* x, out_t* s, int64_t rows, int64_t in, int64_t R, const int64_t* index,
                    const int64_t* ranks, const double* dropouts, const int64_t* key) {
  using acc = acc_t<in_t, out_t>;
  at::parallel_for(0, rows, row_grain(in), [&](int64_t begin, int64_t end) {
    std::vector<acc> sums(R), upper;
    std::vector<acc> factors(key != nullptr ? in : 0);
    std::vector<uint8_t> keep(key != nullptr ? in + kDropoutGroup : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sums.begin(), sums.end(), acc(0));
      const int64_t a = index[t];
      if (a >= 0) {  // a negative index: no adapter, a zero row
        const DropoutKey row_key = bank_row_key(key, dropouts, a);
        const bool dropout = row_key.threshold != 0;
        if (dropout) dropout_factors(row_key, t, in, keep.data(), factors.data());
        const int64_t need = fold_row_scratch(in, ranks[a]);  // ranks differ by row: grown as needed
        if (static_cast<int64_t>(upper.size()) < need) upper.resize(need);
        fold_row(x + t * in, in, ranks[a], dropout ? factors.data() : static_cast<const acc*>(nullptr), sums.data(),
                 upper.data());
      }
      out_t* sr = s + t * R;
      for (int64_t j = 0; j < R; ++j) sr[j] = static_cast<out_t>(sums[j]);
    }
  });
}

template <typename g_t, typename x_t>
void bank_unfold_rows(const g_t* grad_s, x_t* grad_x, int64_t rows, int64_t in, int64_t R, const int64_t* index,
                      const int64_t* ranks, const double* dropouts, const int64_t* key) {
  using acc = acc_t<g_t, x_t>;
  at::parallel_for(0, rows, row_grain(in), [&](int64_t begin, int64_t end) {
    std::vector<acc> factors(key != nullptr ? in : 0);
    std::vector<uint8_t> keep(key != nullptr ? in + kDropoutGroup : 0);
    for (int64_t t = begin; t < end; ++t) {
      x_t* xr = grad_x + t * in;
      const int64_t a = index[t];
      if (a < 0) {
        std::fill(xr, xr + in, x_t(0));
        continue;
      }
      const int64_t r = ranks[a];
      const DropoutKey row_key = bank_row_key(key, dropouts, a);
      const g_t* gr = grad_s + t * R;
      if (row_key.threshold != 0) {
        dropout_factors(row_key, t, in, keep.data(), factors.data());
        const acc* f = factors.data();
        for (int64_t c0 = 0; c0 < in; c0 += r) {
          const int64_t len = std::min(r, in - c0);
          for (int64_t j = 0; j < len; ++j) xr[c0 + j] = static_cast<x_t>(f[c0 + j] * static_cast<acc>(gr[j]));
        }
      } else {
        for (int64_t c0 = 0; c0 < in; c0 += r) {
          const int64_t len = std::min(r, in - c0);
          for (int64_t j = 0; j < len; ++j) xr[c0 + j] = static_cast<x_t>(static_cast<acc>(gr[j]));
        }
      }
    }
  });
}

const double* dropouts_ptr(const at::Tensor& dropouts) {
  return dropouts.defined() ? dropouts.const_data_ptr<double>() : nullptr;
}

}  // namespace

void bank_fold_kernel_cpu(const at::Tensor& x, at::Tensor& s, const at::Tensor& index, const at::Tensor& ranks,
                          const at::Tensor& dropouts, const int64_t* key) {
  check_bank_fold_values("bank_fold", "max_r", ranks.const_data_ptr<int64_t>(), ranks.numel(),
                         dropouts_ptr(dropouts), index.const_data_ptr<int64_t>(), index.numel(), s.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_bank_fold_cpu", [&] {
    const auto run = [&](auto* out) {
      bank_fold_rows(x.const_data_ptr<scalar_t>(), out, x.size(0), x.size(1), s.size(1),
                     index.const_data_ptr<int64_t>(), ranks.const_data_ptr<int64_t>(), dropouts_ptr(dropouts), key);
    };
    if (s.scalar_type() == x.scalar_type()) {
      run(s.mutable_data_ptr<scalar_t>());
    } else {
      run(s.mutable_data_ptr<float>());
    }
  });
}

void bank_fold_grad_kernel_cpu(const at::Tensor& grad_s, at::Tensor& grad_x, const at::Tensor& index,
                               const at::Tensor& ranks, const at::Tensor& dropouts, const int64_t* key) {
  check_bank_fold_values("bank_fold_backward", "grad.shape[-1]", ranks.const_data_ptr<int64_t>(), ranks.numel(),
                         dropouts_ptr(dropouts), index.const_data_ptr<int64_t>(), index.numel(), grad_s.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "miss_bank_fold_grad_cpu", [&] {
    const auto run = [&](const auto* g) {
      bank_unfold_rows(g, grad_x.mutable_data_ptr<scalar_t>(), grad_x.size(0), grad_x.size(1), grad_s.size(1),
                       index.const_data_ptr<int64_t>(), ranks.const_data_ptr<int64_t>(), dropouts_ptr(dropouts), key);
    };
    if (grad_s.scalar_type() == grad_x.scalar_type()) {
      run(grad_s.const_data_ptr<scalar_t>());
    } else {
      run(grad_s.const_data_ptr<float>());
    }
  });
}

}  // namespace miss_ext
