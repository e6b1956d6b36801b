// Row helpers shared by the CPU kernels (fold and tile_add in shard_kernels.cpp, bank_fold in
// bank_fold_kernel.cpp): the parallel grain, a row's dropout factors and a row's fold.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/dropout_mask.h"

namespace miss_ext {

// Rows per parallel task: about 64 K elements of work each.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1)); }

// keep[c] = 1 if column c of `row` is kept, else 0, for c < 4 * groups. Multi-versioned
// (cpu_clones.h) in shard_kernels.cpp: the Philox rounds vectorise across column groups, which
// is most of the cost of dropout on the CPU.
void dropout_keep_groups(const DropoutKey key, int64_t row, int64_t groups, uint8_t* __restrict keep);

// factors[c] = scale if column c of `row` is kept, else 0. `keep` is scratch of >= cols + 3 bytes.
template <typename acc>
void dropout_factors(const DropoutKey& key, int64_t row, int64_t cols, uint8_t* keep, acc* factors) {
  dropout_keep_groups(key, row, (cols + 3) / 4, keep);
  const acc scale = static_cast<acc>(key.scale);
  for (int64_t c = 0; c < cols; ++c) factors[c] = keep[c] ? scale : acc(0);
}

// sum[j] += the row's columns c = j, j + r, ... < in, times factors[c] when factors is not null,
// for j < r. Shard by shard: the inner loop walks r contiguous elements with a fixed accumulator
// offset, which the compiler vectorises.
template <typename acc, typename in_t>
inline void fold_row(const in_t* x, int64_t in, int64_t r, const acc* factors, acc* sum) {
  if (factors != nullptr) {
    for (int64_t c0 = 0; c0 < in; c0 += r) {
      const int64_t len = std::min(r, in - c0);
      for (int64_t j = 0; j < len; ++j) sum[j] += static_cast<acc>(x[c0 + j]) * factors[c0 + j];
    }
  } else {
    for (int64_t c0 = 0; c0 < in; c0 += r) {
      const int64_t len = std::min(r, in - c0);
      for (int64_t j = 0; j < len; ++j) sum[j] += static_cast<acc>(x[c0 + j]);
    }
  }
}

}  // namespace miss_ext
