// Index arithmetic of the adapter bank (miss::bank_fold, miss::bank_add), shared by the CPU and
// CUDA kernels.
//
// Row t uses slot a = index[t] (none when negative). Slot a holds a block of r_a x q_a values at
// bank[a, :r_a, :q_a] inside the (r_cap, q_cap) slot. The row's s[t] has R >= r_a columns, and
// folding it again to r_a columns gives the adapter's own fold:
//   s_a[j] = sum_{m : m r_a + j < R} s[t, m r_a + j]
// which holds for s[t] = miss::bank_fold's row (the fold at r_a, zeros past r_a) and for the fold
// at R when r_a divides R (fold_r(x)[j] = sum_m fold_R(x)[m r + j]). Then out[t, o] += sum_j s_a[j]
// * bank[a, j, o mod q_a]; the gradients follow from the same indices: grad_s[t, k] = sum_c gq[c]
// bank[a, k mod r_a, c] with gq[c] = sum_{o mod q_a = c} grad[t, o], and grad_bank[a, j, c] = sum
// over the rows of a of s_a[j] gq[c].
#pragma once

#include <cstdint>

#include "dropout_mask.h"
#include "host_device.h"
#include "shard_index.h"

namespace miss_ext {

MISS_HD int64_t bank_offset(int64_t slot, int64_t j, int64_t c, int64_t r_cap, int64_t q_cap) {
  return (slot * r_cap + j) * q_cap + c;
}

// s_a[j] of one row (see above), accumulated in `acc`.
template <typename acc, typename T>
MISS_HD acc bank_fold_column(const T* s_row, int64_t R, int64_t r, int64_t j) {
  return strided_sum<acc>(s_row, j, R, r);  // R / r terms: 256 for r = 1 in a bank of r_cap 256
}

// Long sums in two levels: terms go into a partial sum, which is added into the total every
// kSumBlock terms. The rounding error then grows with about kSumBlock + n / kSumBlock terms
// instead of n (n = 65536: 320 instead of 65536), for one more register: the CUDA kernels' sums
// over a slot's rows and along a row; the CPU kernels' vector sums use a full cascade
// (cpu/row_helpers.h) instead.
constexpr int64_t kSumBlock = 64;

// gq[c] of one row of the output gradient: the sum of its columns o with o mod q == c (out / q
// terms: 4096 for mini_r = 1 at out = 4096). In the fold's levels (strided_sum), as MissLinear's
// mini backward folds the same gradient (until 2026-12-02 two levels of kSumBlock: 17-64 terms
// were one running sum).
template <typename acc, typename T>
MISS_HD acc bank_fold_grad(const T* grad_row, int64_t out, int64_t q, int64_t c) {
  return strided_sum<acc>(grad_row, c, out, q);
}

// The dropout key of the rows of slot a in miss::bank_fold: the call's key words (null: no dropout)
// with slot a's rate dropouts[a], so each adapter keeps its own p under one key per call.
MISS_HD DropoutKey bank_row_key(const int64_t* key, const double* dropouts, int64_t a) {
  if (key == nullptr) return DropoutKey{0, 0, 0, 1.0};
  const double p = dropouts[a];
  return DropoutKey{static_cast<uint64_t>(key[0]), static_cast<uint64_t>(key[1]), dropout_threshold(p),
                    dropout_scale(p)};
}

}  // namespace miss_ext
