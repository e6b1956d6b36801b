// Shape helpers on symbolic sizes, for code that runs both on real tensors and under tracing
// (torch.compile / export call the composite kernels and meta kernels with SymInt sizes).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace miss_ext {

// Product of all sizes but the last.
inline c10::SymInt sym_leading_rows(const at::Tensor& t) {
  c10::SymInt rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows = rows * t.sym_size(d);
  return rows;
}

// `t`'s leading sizes followed by `last`.
inline std::vector<c10::SymInt> with_last(const at::Tensor& t, const c10::SymInt& last) {
  std::vector<c10::SymInt> shape(t.sym_sizes().begin(), t.sym_sizes().end());
  shape.back() = last;
  return shape;
}

// A size that kernels need as a plain integer (r, mini_r, in, out: from parameter shapes, which
// torch.compile keeps static). If it is symbolic this specialises on it (a guard): still correct.
inline int64_t static_size(const at::Tensor& t, int64_t dim) { return t.sym_size(dim).guard_int(__FILE__, __LINE__); }

}  // namespace miss_ext
