// CPU kernels for fold and tile_add (see kernels.h for the contract).
//
// Both are parallel over rows. Within a row the loops run shard by shard: the inner loop walks
// r (or Q) contiguous elements with a fixed accumulator or source offset, which the compiler
// vectorises. The dropout mask of a row is generated into a per-thread buffer of `in` factors
// first (one Philox call per eight columns), so the fold loop itself stays a plain multiply-add.
// No temporary of the size of x is ever made.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/shard_index.h"
#include "../kernels.h"
#include "cpu_clones.h"
#include "row_helpers.h"

namespace miss_ext {

// Declared in row_helpers.h (bank_fold_kernel.cpp uses it too).
MISS_CPU_CLONES
void dropout_keep_groups(const DropoutKey key, int64_t row, int64_t groups, uint8_t* __restrict keep) {
  // Branch-free over the groups (the loop that vectorises): 1 kept, 0 dropped, 2 a tie.
  for (int64_t g = 0; g < groups; ++g) {
    const Words4 words = dropout_words(key, row, g);
    for (int k = 0; k < kDropoutGroup; ++k) keep[kDropoutGroup * g + k] = dropout_keep_or_tie(key, dropout_half(words, k));
  }
  // Then the rare ties (2^-16 of the columns), settled one by one. Eight columns are checked at
  // once (a tie is the only value with bit 1 set): this loop does not vectorise in the AVX2 and
  // baseline builds, and with a branch per column it took as long as the Philox loop there (a
  // review's timing, 2026-12-04).
  static_assert(kDropoutGroup == 8, "one 64-bit word per group");
  for (int64_t g = 0; g < groups; ++g) {
    uint64_t bytes;
    std::memcpy(&bytes, keep + kDropoutGroup * g, sizeof(bytes));
    if ((bytes & 0x0202020202020202ull) == 0) continue;
    for (int k = 0; k < kDropoutGroup; ++k) {
      const int64_t c = kDropoutGroup * g + k;
      if (keep[c] == 2) keep[c] = dropout_keep_tie(key, row, c);
    }
  }
}

namespace {

template <typename in_t, typename out_t>
void fold_rows(const in_t* x, out_t* s, int64_t rows, int64_t in, int64_t r, const DropoutKey& key) {
  using acc = acc_t<in_t, out_t>;
  const bool dropout = key.threshold != 0;
  at::parallel_for(0, rows, row_grain(in), [&](int64_t begin, int64_t end) {
    std::vector<acc> sums(r), upper(fold_row_scratch(in, r));
    std::vector<acc> factors(dropout ? in : 0);
    std::vector<uint8_t> keep(dropout ? in + kDropoutGroup : 0);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sums.begin(), sums.end(), acc(0));
      if (dropout) dropout_factors(key, t, in, keep.data(), factors.data());
      fold_row(x + t * in, in, r, dropout ? factors.data() : static_cast<const acc*>(nullptr), sums.data(),
               upper.data());
      out_t* sr = s + t * r;
      for (int64_t j = 0; j < r; ++j) sr[j] = static_cast<out_t>(sums[j]);
    }
  });
}

template <typename out_t, typename src_t>
void tile_add_rows(out_t* out, const src_t* src, int64_t rows, int64_t cols, int64_t period_rows, int64_t q,
                   double alpha_d, const DropoutKey& key) {
  using acc = acc_t<out_t, src_t>;
  const acc alpha = static_cast<acc>(alpha_d);
  const bool dropout = key.threshold != 0;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc> factors(dropout ? cols : 0);
    std::vector<uint8_t> keep(dropout ? cols + kDropoutGroup : 0);
    for (int64_t t = begin; t < end; ++t) {
      out_t* o = out + t * cols;
      const src_t* sr = src + tile_row(t, period_rows) * q;
      if (dropout) {
        dropout_factors(key, t, cols, keep.data(), factors.data());
        const acc* f = factors.data();
        for (int64_t c0 = 0; c0 < cols; c0 += q) {
          const int64_t len = std::min(q, cols - c0);
          for (int64_t j = 0; j < len; ++j)
            o[c0 + j] = static_cast<out_t>(static_cast<acc>(o[c0 + j]) + alpha * f[c0 + j] * static_cast<acc>(sr[j]));
        }
      } else {
        for (int64_t c0 = 0; c0 < cols; c0 += q) {
          const int64_t len = std::min(q, cols - c0);
          for (int64_t j = 0; j < len; ++j)
            o[c0 + j] = static_cast<out_t>(static_cast<acc>(o[c0 + j]) + alpha * static_cast<acc>(sr[j]));
        }
      }
    }
  });
}

}  // namespace

void fold_kernel_cpu(const at::Tensor& x, at::Tensor& s, const DropoutParams& dropout) {
  const DropoutKey key = load_dropout_key(dropout);  // a CPU key: host memory
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_fold_cpu", [&] {
    if (s.scalar_type() == x.scalar_type()) {
      fold_rows<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(), x.size(0),
                                    x.size(1), s.size(1), key);
    } else {
      fold_rows<scalar_t, float>(x.const_data_ptr<scalar_t>(), s.mutable_data_ptr<float>(), x.size(0), x.size(1),
                                 s.size(1), key);
    }
  });
}

void tile_add_kernel_cpu(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutParams& dropout) {
  const DropoutKey key = load_dropout_key(dropout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "miss_tile_add_cpu", [&] {
    if (src.scalar_type() == out.scalar_type()) {
      tile_add_rows<scalar_t, scalar_t>(out.mutable_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), out.size(0),
                                        out.size(1), src.size(0), src.size(1), alpha, key);
    } else {
      tile_add_rows<scalar_t, float>(out.mutable_data_ptr<scalar_t>(), src.const_data_ptr<float>(), out.size(0),
                                     out.size(1), src.size(0), src.size(1), alpha, key);
    }
  });
}

}  // namespace miss_ext
