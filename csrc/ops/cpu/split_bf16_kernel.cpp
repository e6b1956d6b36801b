// CPU kernel of miss::split_bf16 (kernels.h): each output block's row is one pass over t's row,
// computing that block's part of every element (common/bf16_parts.h). Parallel over rows. The CPU
// runs the split path only when asked (MISS_EXT_GEMM=split); this kernel is what the tests compare
// the CUDA one with.
#include <ATen/Parallel.h>

#include <algorithm>

#include "../kernels.h"
#include "row_helpers.h"

namespace miss_ext {
namespace {

// dst[c] = part WHICH of src[c]: one part per pass, so that the loop has no run-time selection
// and the compiler vectorises it.
template <int PARTS, int WHICH>
void part_row(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) dst[c] = Bf16Parts<PARTS>(src[c]).p[WHICH];
}

template <int PARTS>
void split_rows(const float* t, c10::BFloat16* out, int64_t rows, int64_t cols, const Bf16PartOrder& order,
                const Bf16PartLayout& layout) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* src = t + row * cols;
      for (int b = 0; b < order.count; ++b) {
        c10::BFloat16* dst = out + layout.at(b, row, 0);
        const int which = std::min<int>(order.part[b], PARTS - 1);  // < PARTS (checked)
        if (which == 0) part_row<PARTS, 0>(src, dst, cols);
        else if (which == 1) part_row<PARTS, (PARTS > 1 ? 1 : 0)>(src, dst, cols);
        else part_row<PARTS, PARTS - 1>(src, dst, cols);
      }
    }
  });
}

}  // namespace

void split_bf16_kernel_cpu(const at::Tensor& t, at::Tensor& out, int64_t parts, const Bf16PartOrder& order,
                           int64_t dim) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const Bf16PartLayout layout = Bf16PartLayout::of(rows, cols, order.count, dim);
  const float* src = t.const_data_ptr<float>();
  auto* dst = out.mutable_data_ptr<c10::BFloat16>();
  switch (parts) {
    case 1: split_rows<1>(src, dst, rows, cols, order, layout); break;
    case 2: split_rows<2>(src, dst, rows, cols, order, layout); break;
    default: split_rows<3>(src, dst, rows, cols, order, layout); break;
  }
}

}  // namespace miss_ext
