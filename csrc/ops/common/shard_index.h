// Index arithmetic of MiSS shards, shared by the CPU and CUDA kernels.
//
// fold:      S[t, j] = sum over i < in with i mod r == j of x[t, i]  (implicit zero padding:
//            the last, partial shard simply has fewer terms; columns j >= in get no term)
// tile add:  out[t, c] += alpha * src[t mod P, c mod Q]
//            (P == rows: the adjoint of fold, and mini's tiling of S*M along out;
//             P <  rows: merge, where rows are also periodic)
#pragma once

#include <cstdint>
#include <type_traits>

#include "host_device.h"

namespace miss_ext {

// Accumulation type of a kernel reading A and writing B: float64 when either is float64, else
// float32 (also for fp16/bf16 data). Shared so both backends accumulate alike.
template <typename A, typename B>
using acc_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

// Terms summed plainly before a partial sum is carried up a level, in every long sum of the fold
// and its kin (the CPU's cascade, cpu/row_helpers.h; CUDA fold_kernel's two levels): the rounding
// error then grows with about this many terms per level, not with the number of terms.
constexpr int64_t kFoldCascade = 16;

// p[first] + p[first + stride] + ... (indices < end) in `acc`, in three levels of kFoldCascade
// terms (the total of every kFoldCascade parts carried up once more): the rounding error grows
// with about 2 kFoldCascade + n / kFoldCascade^2 terms (n = 4096: 48 instead of 4096). Up to
// kFoldCascade terms it is the plain running sum, bit for bit. For the bank's short strided sums
// (bank_index.h), which the CPU fold's cascade (cpu/row_helpers.h) does not reach.
template <typename acc, typename T>
MISS_HD acc strided_sum(const T* p, int64_t first, int64_t end, int64_t stride) {
  acc total = acc(0), mid = acc(0), part = acc(0);
  int64_t in_part = 0, in_mid = 0;
  for (int64_t k = first; k < end; k += stride) {
    part += static_cast<acc>(p[k]);
    if (++in_part == kFoldCascade) {
      mid += part;
      part = acc(0);
      in_part = 0;
      if (++in_mid == kFoldCascade) {
        total += mid;
        mid = acc(0);
        in_mid = 0;
      }
    }
  }
  return total + (mid + part);
}

// Number of terms summed into shard column j (0 when j >= in).
MISS_HD int64_t fold_terms(int64_t in, int64_t r, int64_t j) {
  return j < in ? (in - 1 - j) / r + 1 : 0;
}

// Number of column vectors of width `vec` a fold thread handles per row.
MISS_HD int64_t vec_groups(int64_t n, int64_t vec) { return n / vec; }

// Maps a flat index over (rows x groups) to (row, group).
struct RowGroup {
  int64_t row;
  int64_t group;
};

MISS_HD RowGroup split_row_group(int64_t flat, int64_t groups_per_row) {
  return RowGroup{flat / groups_per_row, flat % groups_per_row};
}

// Source row of a tile add.
MISS_HD int64_t tile_row(int64_t row, int64_t period_rows) {
  return period_rows == 0 ? 0 : row % period_rows;
}

// Advances a column position modulo q by one, without a division in the loop.
MISS_HD int64_t next_mod(int64_t j, int64_t q) { return j + 1 == q ? 0 : j + 1; }

}  // namespace miss_ext
